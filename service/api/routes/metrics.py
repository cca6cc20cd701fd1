"""/metrics: Prometheus figures for the queue, training throughput, serving latency and loaded adapters."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api import prometheus
from service.api.deps import ModelServerDep, ReadSessionDep

router = APIRouter(tags=["operations"])


# A plain `def`: the database reads run in a worker thread, off the event loop.
@router.get("/metrics", response_class=Response, responses={200: {"content": {prometheus.CONTENT_TYPE: {}}}})
def prometheus_metrics(session: ReadSessionDep, server: ModelServerDep) -> Response:
    figures = prometheus.collect_jobs(session)
    session.close()
    adapters = list(getattr(server, "loaded_adapters", []))
    body = prometheus.render(figures, server.base_model, server.ready, adapters)
    return Response(body, media_type=prometheus.CONTENT_TYPE)
