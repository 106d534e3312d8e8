"""Webhooks: signed POSTs to subscribed URLs when a deployment reaches a final state."""
