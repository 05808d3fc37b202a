"""The producer's OpenAPI document: valid OpenAPI, and its error answers as the API gives them."""

from typing import Any

from openapi_spec_validator import validate

from producer.app import create_app
from shared.settings import ProducerSettings


def document() -> dict[str, Any]:
    settings = ProducerSettings(
        rabbitmq_url="amqp://127.0.0.1/", database_url="postgresql://127.0.0.1/", api_keys="t:k"
    )
    return create_app(settings).openapi()  # made without connecting to anything


def test_the_document_is_valid_openapi() -> None:
    validate(document())


def test_every_error_answer_is_a_problem_and_keyed_operations_say_so() -> None:
    paths = document()["paths"]
    errors = [
        response
        for operations in paths.values()
        for operation in operations.values()
        for code, response in operation["responses"].items()
        if int(code) >= 400
    ]
    assert len(errors) > 20
    for response in errors:
        assert response["description"]
        assert response["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    submit = paths["/orders"]["post"]
    assert submit["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert {"202", "400", "401", "413", "415", "422", "429", "503"} <= set(submit["responses"])
    assert set(submit["responses"]["401"]["headers"]) == {"WWW-Authenticate"}
    assert set(submit["responses"]["429"]["headers"]) == {"Retry-After"}
    assert set(paths["/readyz"]["get"]["responses"]["503"]["headers"]) == {"Retry-After"}
    assert "security" not in paths["/healthz"]["get"]
