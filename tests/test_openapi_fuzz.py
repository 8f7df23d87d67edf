"""Schemathesis over the app's own OpenAPI spec: every operation, with valid and invalid inputs (path parameters
of any text, out-of-range numbers, NUL bytes, random uploads), answers without a server error.

The app serves a real node's state, as in test_api.py: two phantoms received, their inference and outputs run,
a failed delivery; and the node itself (its ingestor and the demo models), so that POST /predict runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.models import Delivery, InferenceResult, Instance, Job, Patient, Study
from dicom_node.node import Node
from tests.node_state import received_node
from web.app import create_app
from web.dependencies import WebContext

# What the node holds, by path parameter name: filled by the node fixture, for test_known_resources.
KNOWN: dict[str, list[object]] = {}
EXAMPLES = 25  # per operation and generation mode: the fuzz file runs in about a minute

# Kept bounded and quiet: no example database written to .hypothesis/, no deadline (the first /predict loads
# torch's kernels), no shrinking (a failure is reported as found, with its reproduction).
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = received_node(tmp_path_factory.mktemp("fuzz"), seed=13).node  # with a failed delivery to retry
    with node.sessions() as session:
        KNOWN.update(
            patient_id=list(session.scalars(select(Patient.patient_id))),
            study_uid=list(session.scalars(select(Study.study_instance_uid))),
            sop_uid=list(session.scalars(select(Instance.sop_instance_uid))),  # the node's report too: no image
            result_id=list(session.scalars(select(InferenceResult.id))),
            delivery_id=list(session.scalars(select(Delivery.id))),
            job_id=list(session.scalars(select(Job.id))),
        )
    yield node
    node.engine.dispose()


def app_over(node: Node, **web: object) -> FastAPI:
    settings = node.settings
    settings = settings.model_copy(update={"web": type(settings.web).model_validate(settings.web.model_dump() | web)})
    return create_app(WebContext(settings, node.sessions, lambda: True, node=node))


@pytest.fixture(scope="module")
def open_app(node: Node) -> FastAPI:
    return app_over(node)


@pytest.fixture(scope="module")
def signed_in_app(node: Node) -> FastAPI:
    """Sign-in required (a provider is configured; it never answers), so every request without it is refused."""
    return app_over(node, oidc={"issuer": "http://127.0.0.1:9", "client_id": "node", "client_secret": "secret"})


# The spec does not depend on the node's state or settings (the token is always a documented bearer scheme), so
# it is loaded at import from an app over default settings that is never called: each case is sent to the app
# over the fixture's node with `app=`. (schemathesis.pytest.from_fixture would load it from a fixture, but its
# lazy schema fails under pytest 9.2: it sets the private Function._nodeid, which is gone.)
def load_schema():
    settings = Settings(storage={"root": tempfile.mkdtemp(prefix="fuzz-schema-")})  # the app keeps its key there
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(WebContext(settings, None, lambda: True)))


open_schema = load_schema()
# Without users, a request without the documented bearer header is valid (open on loopback), not negative data.
open_schema.config.generation.update(with_security_parameters=False)
signed_in_schema = load_schema()
# The operations on one patient, study, instance, result or delivery, with only what the node holds in their path
# (random ones mostly answer 404 before the rest of the request is looked at): their query parameters (max_size
# from 64 to 4096) over the real images and heatmaps, and a failed delivery retried.
known_schema = load_schema().include(path_regex=r"\{")
known_schema.config.generation.update(modes=[GenerationMode.POSITIVE])
# The same inputs on every run (a failure is not one CI run's luck); FUZZ_SEED=<int> explores others.
for schema in (open_schema, signed_in_schema, known_schema):
    schema.config.seed = int(os.environ.get("FUZZ_SEED", "1906"))


@known_schema.hook
def flatmap_path_parameters(context, path_parameters: dict[str, object]):
    return st.fixed_dictionaries({name: st.sampled_from(KNOWN[name]) for name in path_parameters})


@open_schema.parametrize()
@FUZZ_SETTINGS
def test_no_server_error(case, open_app: FastAPI) -> None:
    # All the checks but the two below: no 5xx, status codes, content types and JSON bodies as documented, and
    # invalid input refused.
    # - positive_data_acceptance: a valid request about an unknown patient, instance or result rightly gets a
    #   404, and a valid upload of random bytes a 415 or 422.
    # - response_headers_conformance, missing_required_header, unsupported_method and the auth checks do not
    #   apply to this token-free config (none of the operations documents response headers).
    case.call_and_validate(
        app=open_app,
        checks=[
            schemathesis.checks.not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )


@signed_in_schema.parametrize()
@hypothesis.settings(FUZZ_SETTINGS, max_examples=5)
def test_no_server_error_when_sign_in_is_required(case, signed_in_app: FastAPI) -> None:
    # A request without sign-in (or with a random bearer token) is refused with 401, never a 5xx; the 401 of the
    # routes is not in the spec, so only the server-error check applies.
    case.call_and_validate(app=signed_in_app, checks=[schemathesis.checks.not_a_server_error])


@known_schema.parametrize()
@hypothesis.settings(FUZZ_SETTINGS, max_examples=10)
def test_known_resources(case, open_app: FastAPI) -> None:
    assert KNOWN, "the node fixture lists what the node holds"
    case.call_and_validate(
        app=open_app,
        checks=[
            schemathesis.checks.not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
