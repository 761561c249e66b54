"""Failover: two `agentprm serve` processes behind nginx on 127.0.0.1; one is killed (SIGKILL) halfway
through a bounded load of SDK clients. The SDK's retries (connection errors, 429, 502, 503, with
backoff) give 0 failed client requests, and every answer equals the reference score.

Needs the nginx binary (Debian package `nginx`; `make test-failover` installs it); skipped without it.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from clients import PRMClient
from tests.conftest import start_server, stop_server, trajectory_json
from tests.reliability.helpers import metric
from tests.reliability.nginx_failover import Nginx, nginx_binary

pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (apt-get install -y nginx; make test-failover)")

CLIENTS, PER_CLIENT = 6, 16


class CountingTransport(httpx.HTTPTransport):
    """Counts what the SDK saw on the wire (status codes, transport errors) before its retries."""

    def __init__(self, seen: collections.Counter):
        super().__init__()
        self.seen = seen

    def handle_request(self, request):
        try:
            response = super().handle_request(request)
        except httpx.TransportError as exc:
            self.seen[type(exc).__name__] += 1
            raise
        self.seen[response.status_code] += 1
        return response


def test_killing_one_of_two_servers_loses_no_client_request(tiny_checkpoint):
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(tiny_checkpoint, "--max-batch-tokens", "2048"), range(2)))
    (victim, victim_url), (survivor, survivor_url) = servers
    ports = [int(url.rsplit(":", 1)[1]) for _, url in servers]
    bodies = [[trajectory_json(f"failover {i}", 1 + (i + k) % 6, seed=i * 31 + k)] for i in range(12)
              for k in range(2)]
    done = {"n": 0}
    lock = threading.Lock()
    killed = threading.Event()
    failures: list[BaseException] = []
    answers: dict[int, float] = {}
    seen: collections.Counter = collections.Counter()
    try:
        with Nginx(ports) as proxy:
            with PRMClient(survivor_url) as direct:
                reference = [direct.score(b).results[0].score for b in bodies]
            survivor_before = metric(survivor_url, 'agentprm_requests_total{route="/v1/score",status="200"}')

            def client(c: int):
                with PRMClient(proxy.url, max_retries=6, backoff_base_s=0.05, backoff_cap_s=2.0,
                               transport=CountingTransport(seen)) as sdk:
                    for r in range(PER_CLIENT):
                        i = (c * PER_CLIENT + r) % len(bodies)
                        try:
                            answers[c * PER_CLIENT + r] = sdk.score(bodies[i]).results[0].score
                            assert abs(answers[c * PER_CLIENT + r] - reference[i]) < 1e-5
                        except BaseException as exc:  # noqa: BLE001 (counted, reported below)
                            failures.append(exc)
                        with lock:
                            done["n"] += 1
                            if done["n"] == CLIENTS * PER_CLIENT // 2 and not killed.is_set():
                                victim.kill()  # SIGKILL mid-load: connections drop, nothing drains
                                killed.set()

            threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            served_by_survivor = metric(survivor_url, 'agentprm_requests_total{route="/v1/score",status="200"}') \
                - survivor_before
    finally:
        for proc, _ in servers:
            stop_server(proc)
    assert killed.is_set() and victim.poll() is not None
    assert not failures, f"{len(failures)} failed client requests, first: {failures[0]!r}"
    assert len(answers) == CLIENTS * PER_CLIENT
    assert served_by_survivor > CLIENTS * PER_CLIENT // 2  # it took over the dead server's share
    print(f"\nfailover: {CLIENTS * PER_CLIENT} SDK requests, 0 failed; the survivor served {served_by_survivor:.0f}; "
          f"seen on the wire before retries: {dict(seen)}")
