"""Bad input gets a problem document naming the field; unknown ids get 404; nothing gets a 500."""

import uuid

import pytest

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


async def test_project_duplicate_name_conflicts(client, project):
    response = await client.post("/api/jarvis/projects", json={"name": project["name"]})

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    assert project["name"] in response.json()["detail"]


@pytest.mark.parametrize(
    "name",
    ["MyApp", "-app", "app name", "", "a" * 30, "app.name"],
)
async def test_project_invalid_name_rejected(client, name):
    response = await client.post("/api/jarvis/projects", json={"name": name})

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["field"] == "body.name"


async def test_project_get_and_list(client, project):
    one = await client.get(f"/api/jarvis/projects/{project['id']}")
    listing = await client.get("/api/jarvis/projects")

    assert one.json()["name"] == project["name"]
    assert project["name"] in [item["name"] for item in listing.json()]


@pytest.mark.parametrize(
    "path",
    [
        "/api/jarvis/projects/{id}",
        "/api/jarvis/deployments/{id}",
        "/api/jarvis/deployments/{id}/compose",
        "/api/jarvis/deployments/{id}/logs",
    ],
)
async def test_unknown_id_is_not_found(client, path):
    response = await client.get(path.format(id=uuid.uuid4()))

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM


async def test_malformed_id_is_422(client):
    response = await client.get("/api/jarvis/deployments/not-a-uuid")

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "path.deployment_id"


async def test_stop_unknown_deployment_is_not_found(client):
    response = await client.post(f"/api/jarvis/deployments/{uuid.uuid4()}/stop")

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"image_ref": "app:", "port": 8080}, "body.image_ref"),
        ({"image_ref": "MyApp:v1", "port": 8080}, "body.image_ref"),
        ({"image_ref": "app:v1", "port": 0}, "body.port"),
        ({"image_ref": "app:v1", "port": 65536}, "body.port"),
        ({"image_ref": "app:v1", "port": 80, "environment": {"DEBUG": True}}, "body.environment.DEBUG"),
        ({"image_ref": "app:v1", "port": 80, "volumes": [{"source": "data/x", "target": "/d"}]}, "body.volumes.0.source"),
        ({"image_ref": "app:v1", "port": 80, "domain": "bad_domain.example"}, "body.domain"),
        ({"image_ref": "app:v1", "port": 80, "strategy": "yolo"}, "body.strategy"),
        ({"image_ref": "app:v1", "port": 80, "unknown_option": 1}, "body.unknown_option"),
    ],
)
async def test_deploy_invalid_field_named(client, project, body, field):
    response = await client.post("/api/jarvis/deployments/deploy", json={"project_id": project["id"], **body})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    fields = [error["field"] for error in response.json()["errors"]]
    assert any(found.startswith(field) for found in fields), fields


async def test_deploy_unknown_project_is_422(client):
    body = {"project_id": str(uuid.uuid4()), "image_ref": "app:v1", "port": 80}

    response = await client.post("/api/jarvis/deployments/deploy", json=body)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.project_id"


@pytest.mark.parametrize("payload", [b"{", b"[]", b"null", b'"text"', "{\"port\": \"\ud800\"}".encode("utf-8", "surrogatepass")])
async def test_deploy_malformed_json_is_422(client, payload):
    response = await client.post(
        "/api/jarvis/deployments/deploy", content=payload, headers={"content-type": "application/json"}
    )

    assert response.status_code == 422


async def test_logs_tail_bounded(client, settings):
    response = await client.get(
        f"/api/jarvis/deployments/{uuid.uuid4()}/logs", params={"tail": settings.logs_max_tail + 1}
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.tail"


async def test_unknown_route_is_problem(client):
    response = await client.get("/api/jarvis/nothing-here")

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM


async def test_healthz_and_readyz(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}

    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "docker": "ok"}



async def test_body_that_is_not_json_names_the_body(client):
    response = await client.post(
        "/api/jarvis/deployments/deploy", content=b'{"force": tru', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error["field"] == "body"
    assert "not valid JSON" in error["message"]
    assert "character" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", "8080"), ("port", 8080.0), ("port", True), ("host_port", "18080"), ("replicas", "2"), ("parallelism", 1.0)],
)
async def test_integer_fields_accept_only_json_integers(client, project, field, value):
    body = {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080, field: value}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == f"body.{field}"
    assert "integer" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("retries", "1"), ("retries", 30.0), ("retries", False), ("interval", "0.5"), ("timeout", True), ("start_period", "5")],
)
async def test_health_check_numbers_are_strict(client, project, field, value):
    healthcheck = {"type": "http", "path": "/", field: value}
    body = {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080, "healthcheck": healthcheck}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == f"body.healthcheck.{field}"


@pytest.mark.parametrize("value", ["yes", 1, "true", 0, None])
async def test_force_accepts_only_json_booleans(client, project, value):
    body = {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080, "force": value}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body.force"
