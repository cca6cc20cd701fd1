"""/metrics: Prometheus figures for the queue, training throughput, serving latency and loaded adapters."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service import metrics
from service.api.deps import ModelServerDep, ReadSessionDep

router = APIRouter(tags=["operations"])


# A plain `def`: the database reads run in a worker thread, off the event loop.
@router.get("/metrics", response_class=Response, responses={200: {"content": {metrics.CONTENT_TYPE: {}}}})
def prometheus_metrics(session: ReadSessionDep, server: ModelServerDep) -> Response:
    figures = metrics.collect_jobs(session)
    session.close()
    adapters = list(getattr(server, "loaded_adapters", []))
    body = metrics.render(figures, server.base_model, server.ready, adapters)
    return Response(body, media_type=metrics.CONTENT_TYPE)
