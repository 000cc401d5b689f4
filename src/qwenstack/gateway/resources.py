"""Everything a running gateway holds, opened together and closed in reverse.

Handlers reach it through `resources(request)`: one typed object instead of loose attributes
of `app.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
from starlette.requests import HTTPConnection

from qwenstack.gateway import metrics, workers
from qwenstack.gateway.admission import Admission
from qwenstack.gateway.auth import Authenticator
from qwenstack.gateway.cache import AnswerCache
from qwenstack.gateway.catalogue import ModelCatalogue
from qwenstack.gateway.gpu_metrics import GpuCollector
from qwenstack.gateway.knowledge_bases import Knowledge
from qwenstack.gateway.limit_stores import RedisStore
from qwenstack.gateway.limits import Limiter
from qwenstack.gateway.replicas import DnsDiscovery, ReplicaPool
from qwenstack.gateway.routing import make_policy
from qwenstack.gateway.upstream import Upstream
from qwenstack.gateway.usage import UsageRecorder
from qwenstack.keys import KeyStore
from qwenstack.settings import GatewaySettings, Settings

# Idle pooled connections to an engine are dropped before vLLM drops them (its uvicorn closes
# them after VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default), so a request rarely meets a closed one.
ENGINE_KEEPALIVE_S = 4


@dataclass
class Resources:
    settings: Settings
    keys: KeyStore
    authenticator: Authenticator
    usage: UsageRecorder
    pool: ReplicaPool
    catalogue: ModelCatalogue
    upstream: Upstream
    exposition: metrics.Exposition
    cache: AnswerCache
    limiter: Limiter
    admission: Admission
    knowledge: Knowledge
    _exit: contextlib.AsyncExitStack

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        """Open every part; a part that fails to open closes those opened before it."""
        async with contextlib.AsyncExitStack() as stack:
            gateway, engine = settings.gateway, settings.engine
            keys = await asyncio.to_thread(KeyStore.open, settings)
            stack.callback(keys.engine.dispose)
            usage = UsageRecorder(keys.engine)
            await usage.start()
            stack.push_async_callback(usage.stop)  # after the last request: none unrecorded
            session = await stack.enter_async_context(engine_session(gateway))
            limiter = Limiter(settings.limits, max_buckets=settings.auth.jwt.max_subjects,
                              shared_file=workers.shared_limits_file(settings))
            stack.push_async_callback(limiter.close)
            if isinstance(limiter.store, RedisStore):
                await limiter.store.warn_if_evicting()
            pool = ReplicaPool(
                engine.replica_urls(), session, gateway.health_interval_s,
                settings.admission.circuit_failures, settings.admission.circuit_cooldown_s,
                discovery=DnsDiscovery(
                    tuple(engine.discovery_dns), engine.discovery_port,
                    engine.discovery_interval_s,
                ) if engine.discovery_dns else None,
            )
            await pool.start()
            stack.push_async_callback(pool.stop)
            registry = metrics.registry()
            engines = metrics.PoolCollector(pool)
            registry.register(engines)
            stack.callback(registry.unregister, engines)
            gpus = GpuCollector.start()
            if gpus:
                registry.register(gpus)
                stack.callback(gpus.stop)
                stack.callback(registry.unregister, gpus)
            cache = await AnswerCache.open(settings.cache, settings.rag)
            stack.push_async_callback(cache.close)
            knowledge = Knowledge(settings, engines=pool.urls_serving)
            stack.callback(knowledge.close)
            resources = cls(
                settings=settings,
                keys=keys,
                authenticator=Authenticator(settings.auth, keys),
                usage=usage,
                pool=pool,
                catalogue=ModelCatalogue(settings, pool),
                upstream=Upstream(pool, session, make_policy(settings.routing)),
                exposition=metrics.Exposition(
                    pool, session, registry, engine_metrics=settings.observability.engine_metrics,
                    timeout_s=settings.observability.engine_metrics_timeout_s,
                ),
                cache=cache,
                limiter=limiter,
                admission=Admission(settings.admission, gateway.workers or 1),
                knowledge=knowledge,
                _exit=stack.pop_all(),
            )
        return resources

    async def close(self) -> None:
        await self._exit.aclose()


def engine_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """The pooled HTTP client for every call to the engines."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0, limit_per_host=settings.max_connections_per_engine,
            keepalive_timeout=ENGINE_KEEPALIVE_S,
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s,
        ),
        auto_decompress=False,  # the engines' bytes are relayed as they come
    )


def resources(connection: HTTPConnection) -> Resources:
    """The running gateway's resources, from a request (or an ASGI scope's app)."""
    found: Resources = connection.app.state.resources
    return found
