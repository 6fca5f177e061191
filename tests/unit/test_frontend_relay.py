"""Extra workload front ends (issue 17): the relay's rules and the summed metrics.

The relay runs here over a real socketpair, both ends in one event loop; the first front
end's connection to its PKCS#11 worker is replaced by a recorder (the real worker path is
covered by tests/cluster/test_unwrap_frontends.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from kustody.api import wire
from kustody.api.errors import HsmError, Reason
from kustody.api.health import Health
from kustody.sidecar.connection import Waiter
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.relay import READY, RelayLink, RelayPort
from kustody.sidecar.unwrap.frontends import (
    FrontEndMetrics,
    config_from_document,
    settings_document,
    shared_limits,
    usable_cores,
)
from kustody.sidecar.unwrap.metrics import UnwrapMetrics, snapshot
from kustody.sidecar.unwrap.server import WorkloadConfig
from kustody.sidecar.unwrap.tokens import ReviewLimits
from prometheus_client import CollectorRegistry, generate_latest


class Recorder:
    """Stands in for the first front end's HsmConnection: records what reaches the worker."""

    def __init__(self) -> None:
        self.health = Health(True, None, "token ok")
        self.submitted: list[tuple[int, Any]] = []
        self.answer: Any = None
        self.error: HsmError | None = None

    def submit(self, op: wire.Op, args: Any, waiter: Waiter) -> None:
        self.submitted.append((op, args))
        if self.error is not None:
            raise self.error
        waiter.set_result(self.answer)


async def _pair(recorder: Recorder) -> tuple[RelayPort, RelayLink, list[tuple[int, Any]]]:
    first, extra = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    notices: list[tuple[int, Any]] = []
    port = RelayPort(
        recorder,  # type: ignore[arg-type]
        first,
        asyncio.get_running_loop(),
        on_notice=lambda op, body: notices.append((op, body)),
        on_closed=lambda: notices.append((-1, None)),
    )
    link = RelayLink(extra)
    link.open()
    return port, link, notices


def test_a_decrypt_batch_is_relayed_to_the_worker_as_it_is() -> None:
    async def run() -> None:
        recorder = Recorder()
        recorder.answer = [b"k" * 32, ("AAD_MISMATCH", "no")]
        port, link, _ = await _pair(recorder)
        items = [("ring", 1, b"n" * 12, b"c" * 48, b"aad"), ("ring", 2, b"m" * 12, b"d", b"x")]
        answer = await link.request(wire.Op.DECRYPT, items)
        assert recorder.submitted == [(wire.Op.DECRYPT, items)]
        assert answer == [b"k" * 32, ("AAD_MISMATCH", "no")]
        assert link.health == recorder.health  # mirrored from the answer
        link.close()
        port.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "op",
    [wire.Op.CREATE, wire.Op.SET_STATE, wire.Op.DESTROY, wire.Op.SEAL, wire.Op.GENERATE,
     wire.Op.REWRAP, wire.Op.EXPORT_ESCROW, wire.Op.AGENT, wire.Op.RESCAN, wire.Op.DESCRIBE],
)  # fmt: skip
def test_an_extra_front_end_can_do_nothing_with_the_token_but_decrypt(op: wire.Op) -> None:
    async def run() -> None:
        recorder = Recorder()
        port, link, _ = await _pair(recorder)
        with pytest.raises(HsmError) as err:
            await link.request(op, ("ring", 1))
        assert err.value.reason is Reason.PERMISSION_DENIED
        assert recorder.submitted == []  # nothing reached the worker
        link.close()
        port.close()

    asyncio.run(run())


def test_check_is_answered_from_the_mirror_without_asking_the_worker() -> None:
    async def run() -> None:
        recorder = Recorder()
        recorder.health = Health(False, Reason.PIN_INCORRECT, "the PIN is wrong")
        port, link, _ = await _pair(recorder)
        health = await link.check(force=True)
        assert health == recorder.health
        assert recorder.submitted == []
        link.close()
        port.close()

    asyncio.run(run())


def test_a_worker_error_reaches_the_extra_front_end_typed() -> None:
    async def run() -> None:
        recorder = Recorder()
        recorder.error = HsmError(Reason.TOKEN_UNAVAILABLE, "the worker died")
        port, link, _ = await _pair(recorder)
        with pytest.raises(HsmError) as err:
            await link.request(wire.Op.DECRYPT, [])
        assert (err.value.reason, err.value.message) == (
            Reason.TOKEN_UNAVAILABLE,
            "the worker died",
        )
        link.close()
        port.close()

    asyncio.run(run())


def test_when_the_first_front_end_goes_away_calls_in_flight_fail_and_the_link_closes() -> None:
    async def run() -> None:
        recorder = Recorder()
        port, link, _ = await _pair(recorder)
        recorder.submit = lambda op, args, waiter: None  # type: ignore[method-assign]
        pending = asyncio.ensure_future(link.request(wire.Op.DECRYPT, []))
        await asyncio.sleep(0.05)
        port.close()
        with pytest.raises(HsmError) as err:
            await pending
        assert err.value.reason is Reason.TOKEN_UNAVAILABLE
        await asyncio.wait_for(link.closed.wait(), 5)
        with pytest.raises(HsmError):
            link.submit(wire.Op.DECRYPT, [], asyncio.get_running_loop().create_future())

    asyncio.run(run())


def test_a_keyservice_over_a_relay_decrypts_through_it() -> None:
    """KeyService needs nothing of its link but what RelayLink has (the TokenLink protocol)."""

    async def run() -> None:
        recorder = Recorder()
        port, link, _ = await _pair(recorder)
        service = KeyService(link)
        assert (await service.health()).serving
        link.close()
        port.close()

    asyncio.run(run())


def test_ready_notices_and_metrics_answers_cross_the_relay() -> None:
    async def run() -> None:
        port, link, notices = await _pair(Recorder())
        registry = CollectorRegistry()
        metrics = UnwrapMetrics(registry)
        metrics.observe("shop", "ok", 0.002)
        link.on_metrics = lambda: snapshot(registry)
        link.notify(READY, ())
        answer = await asyncio.wait_for(port.ask_metrics(), 5)
        assert answer == snapshot(registry)
        assert notices == [(READY, ())]
        link.close()
        await asyncio.sleep(0.05)
        assert notices[-1] == (-1, None)  # the first front end hears the extra one is gone
        port.close()

    asyncio.run(run())


# -- the summed metrics ------------------------------------------------------------------------


class _FrontEnds:
    count = 3
    _loop = None

    def running(self) -> int:
        return 2


def _sample(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in\n{text}")


def test_the_served_metrics_are_the_sum_of_every_front_end_and_never_go_down() -> None:
    merged = FrontEndMetrics(_FrontEnds())  # type: ignore[arg-type]
    served = CollectorRegistry()
    served.register(merged)
    first = UnwrapMetrics(merged.own)
    first.observe("shop", "ok", 0.001)
    second_registry = CollectorRegistry()
    second = UnwrapMetrics(second_registry)
    for _ in range(3):
        second.observe("shop", "ok", 0.004)
    second.observe("billing", "RATE_LIMITED", 0.0001)  # a label set only front end 1 saw
    second.review("ok")
    merged._last[1] = dict(_flatten(snapshot(second_registry)))

    text = generate_latest(served).decode()
    ok = 'kustody_unwrap_requests_total{namespace="shop",outcome="ok"}'
    assert _sample(text, ok) == 4.0
    billing = 'kustody_unwrap_requests_total{namespace="billing",outcome="RATE_LIMITED"}'
    assert _sample(text, billing) == 1.0
    assert _sample(text, 'kustody_unwrap_duration_seconds_count{result="ok"}') == 4.0
    assert _sample(text, 'kustody_unwrap_token_reviews_total{result="ok"}') == 1.0
    assert _sample(text, "kustody_unwrap_front_ends") == 2.0
    assert _sample(text, 'kustody_unwrap_front_end_requests_total{front_end="0"}') == 1.0
    assert _sample(text, 'kustody_unwrap_front_end_requests_total{front_end="1"}') == 4.0
    assert _sample(text, 'kustody_unwrap_front_end_requests_total{front_end="2"}') == 0.0

    merged.retire(1)  # front end 1 exited: its counts stay in the sums
    text = generate_latest(served).decode()
    assert _sample(text, ok) == 4.0
    assert _sample(text, 'kustody_unwrap_front_end_requests_total{front_end="1"}') == 4.0
    # ... and its restarted process counts on from zero, added to what it left
    restarted = CollectorRegistry()
    UnwrapMetrics(restarted).observe("shop", "ok", 0.001)
    merged._last[1] = dict(_flatten(snapshot(restarted)))
    text = generate_latest(served).decode()
    assert _sample(text, ok) == 5.0
    assert _sample(text, 'kustody_unwrap_front_end_requests_total{front_end="1"}') == 5.0
    # a gauge is not carried over from an exited front end
    assert _sample(text, "kustody_unwrap_token_reviews_in_flight") == 0.0


def _flatten(answer: Any) -> Any:
    from kustody.sidecar.unwrap import frontends

    return frontends._flatten(answer)


# -- settings ----------------------------------------------------------------------------------


def test_the_review_limits_that_protect_the_api_server_are_shared_between_front_ends() -> None:
    limits = ReviewLimits(peer_rate=10, peer_burst=20, rate=50, burst=100, in_flight=16)
    assert shared_limits(limits, 1) == limits
    share = shared_limits(limits, 4)
    assert (share.rate, share.burst, share.in_flight) == (12.5, 25.0, 4)
    assert (share.peer_rate, share.peer_burst) == (10, 20)  # per front end, as documented
    assert shared_limits(ReviewLimits(burst=2, in_flight=1), 8).in_flight == 1


def test_an_extra_front_end_gets_the_first_ones_settings_and_nothing_secret(
    tmp_path: Path,
) -> None:
    config = WorkloadConfig(
        listen="127.0.0.1:8443",
        tls_cert=tmp_path / "tls.crt",
        tls_key=tmp_path / "tls.key",
        rate=7.0,
        review_limits=ReviewLimits(rate=3.0, burst=4.0),
    )
    document = settings_document(config, kubeconfig="/k/config", log_level="DEBUG")
    assert config_from_document(document) == config
    assert document["kubeconfig"] == "/k/config"
    assert set(document) <= {f.name for f in dataclasses.fields(WorkloadConfig)} | {
        "kubeconfig",
        "log_level",
    }


def test_usable_cores_is_at_least_one_and_at_most_the_affinity() -> None:
    import os

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("given", "count"), [(None, usable_cores()), ("1", 1), ("5", 5)])
def test_the_front_end_count_comes_from_the_flag_or_the_cores(
    tmp_path: Path, given: str | None, count: int
) -> None:
    from kustody.cli import build_parser
    from kustody.sidecar.unwrap.commands import config_from, front_ends_of

    argv = ["hsm", "--module", "/m.so", "--token-label", "t", "--workload-listen", "0.0.0.0:1"]
    argv += ["--workload-tls-cert", str(tmp_path / "c"), "--workload-tls-key", str(tmp_path / "k")]
    args = build_parser().parse_args([*argv, *(["--workload-front-ends", given] if given else [])])
    assert front_ends_of(args) == count
    assert config_from(args).review_limits == shared_limits(ReviewLimits(), count)


@pytest.mark.parametrize("given", ["0", "65", "-1"])
def test_a_front_end_count_outside_1_to_64_is_refused_naming_the_flag(
    tmp_path: Path, given: str
) -> None:
    from kustody.cli import build_parser
    from kustody.errors import UserError
    from kustody.sidecar.unwrap.commands import config_from

    argv = ["hsm", "--module", "/m.so", "--token-label", "t", "--workload-listen", "0.0.0.0:1"]
    argv += ["--workload-tls-cert", str(tmp_path / "c"), "--workload-tls-key", str(tmp_path / "k")]
    args = build_parser().parse_args([*argv, "--workload-front-ends", given])
    with pytest.raises(UserError, match="--workload-front-ends"):
        config_from(args)
