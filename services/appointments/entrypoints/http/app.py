"""``create_app``: the Litestar application of the appointments API."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, Schema

from contracts.commands import CancelBody, ScheduleBody
from services.appointments.bootstrap import Container
from services.appointments.entrypoints.http.appointments import AppointmentsController
from services.appointments.entrypoints.http.openapi import SECURITY_SCHEMES
from services.appointments.entrypoints.http.problems import EXCEPTION_HANDLERS
from services.appointments.entrypoints.http.tracing import RequestTracing
from services.appointments.entrypoints.http.visits import VisitsController
from services.ops import MAX_REQUEST_BODY_BYTES, HealthController, Probes


def create_app(container: Container) -> Litestar:
    """The HTTP API over an already-built container (its lifespan is the caller's)."""
    app = Litestar(
        route_handlers=[AppointmentsController, VisitsController, HealthController],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[RequestTracing()],
        request_max_body_size=MAX_REQUEST_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="Clinic appointments",
            version="1.0.0",
            description="Appointments and visits of a telehealth clinic, for the mobile gateway.",
            path="/schema",
            render_plugins=[JsonRenderPlugin(), SwaggerRenderPlugin()],
            components=Components(security_schemes=SECURITY_SCHEMES),
        ),
        state=State(
            {"container": container, "probes": Probes(container.probe_pool, container.nats_link)}
        ),
        debug=False,
        logging_config=None,
    )
    close_body_schemas(app)
    return app


def close_body_schemas(app: Litestar) -> None:
    """Mark the request bodies' schemas closed (``additionalProperties: false``): the
    service refuses unknown fields (400), which Litestar's document does not say. The
    document is made once; this edits it before it is first served."""
    schemas = app.openapi_schema.components.schemas or {}
    for struct in (ScheduleBody, CancelBody):
        schema = schemas.get(struct.__name__)
        if isinstance(schema, Schema):
            schema.additional_properties = False
