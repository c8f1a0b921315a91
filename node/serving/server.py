"""The grpc.aio server of a node: the two loraledger services, the standard health service and reflection.

    server = NodeServer(config.server, inference_servicer, attribution_servicer)
    port = await server.start()          # bound, serving; health NOT_SERVING until set_serving(True)
    server.set_serving(True)             # once the engine is ready
    await server.drain()                 # SIGTERM: NOT_SERVING, stop accepting, in-flight calls get
                                         # `grace_seconds` to finish, the rest are cancelled (their engine
                                         # requests freed), pending records flushed

With `[tls]` the port speaks TLS only. With `tls.client_ca_file` it is mutual TLS: every client presents a
certificate from that CA (grpcio can require client certificates per port, not per call; the servicer also
checks the verified peer identity on the admin calls). The HTTP API, which has no admin calls, stays server TLS.

Message size limits (both directions) come from `server.max_message_bytes`: a larger request is refused by gRPC
itself with RESOURCE_EXHAUSTED before any handler runs. Health answers for the overall server ("") and for each
service by its full name, so load balancers can probe either.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraledger.node.config import ServerConfig, TlsConfig
from loraledger.node.serving.servicers import AttributionServicer, InferenceServicer
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ATTRIBUTION_SERVICE = pb.DESCRIPTOR.services_by_name["Attribution"].full_name


class NodeServer:
    """One grpc.aio server on `config.listen` (see module docstring). Use from a running asyncio loop."""

    def __init__(
        self,
        config: ServerConfig,
        inference: InferenceServicer,
        attribution: AttributionServicer | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.inference = inference
        self.attribution = attribution
        self.health = health.aio.HealthServicer()
        self.services = [INFERENCE_SERVICE] + ([ATTRIBUTION_SERVICE] if attribution is not None else [])
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Build, bind and start the server; returns the bound port (a `:0` listen address picks a free one)."""
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(self.inference, server)
        if self.attribution is not None:
            pb_grpc.add_AttributionServicer_to_server(self.attribution, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        if self.tls is not None and self.tls.cert_file:
            ca = Path(self.tls.client_ca_file).read_bytes() if self.tls.client_ca_file else None
            creds = grpc.ssl_server_credentials(
                [(Path(self.tls.key_file).read_bytes(), Path(self.tls.cert_file).read_bytes())],
                root_certificates=ca, require_client_auth=ca is not None)
            port = server.add_secure_port(self.config.listen, creds)
        else:
            port = server.add_insecure_port(self.config.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}: the address is in use or not local; "
                          "set server.listen (or --listen) to a free HOST:PORT")
        await server.start()
        self._server, self.port = server, port
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("gRPC server listening on %s (port %d)", self.config.listen, port)
        return port

    async def _set_status(self, status: int) -> None:
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING (engine ready) or NOT_SERVING (starting, draining) for the server and every service."""
        await self._set_status(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, give in-flight calls `grace` s (default
        `server.grace_seconds`) to finish, cancel the rest, then wait for every record of a finished request."""
        if self._server is None:
            return
        await self.set_serving(False)
        grace = self.config.grace_seconds if grace is None else grace
        log.info("draining: %d request(s) in flight, grace %.1f s", self.inference.inflight, grace)
        await self._server.stop(grace)
        await self.inference.flush()
        self._server = None
        log.info("gRPC server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
