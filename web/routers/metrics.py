"""``GET /metrics``: the node's figures in Prometheus's text format (:mod:`dicom_node.metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node.metrics import IndexCollector
from web.dependencies import ContextDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(context: ContextDep) -> Response:
    """Instances received, jobs and deliveries by state, inference latency per task and refused C-STOREs;
    without a running node, the counts of the index only."""
    if context.node is not None:
        registry = context.node.metrics.registry
    else:
        registry = CollectorRegistry()
        registry.register(IndexCollector(context.sessions))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
