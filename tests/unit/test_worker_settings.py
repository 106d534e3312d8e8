"""arq worker settings that other workers on the same Redis must not disturb."""

from workers.settings import WorkerSettings, settings


def test_cron_job_names_carry_the_queue() -> None:
    # arq derives a unique cron job's id from its name, and job ids are shared by every queue in Redis.
    names = [job.name for job in WorkerSettings.cron_jobs]

    assert len(names) == len(set(names))
    for name in names:
        assert f":{settings.queue_name}:" in name
