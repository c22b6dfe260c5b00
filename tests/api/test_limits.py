"""Size limits and cursor paging, over real HTTP (uvicorn) on SQLite and PostgreSQL.

Bodies over their limit are a 413 that says the limit, whether the client sends a
``Content-Length`` or streams the body in chunks; fields over theirs are a 422 naming the
field; every list endpoint pages with a cursor, and the client and the CLI follow it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from scheduler import client as client_module
from scheduler.api.bodylimit import BodyLimit, BodyRule, describe_size
from scheduler.api.paging import decode_cursor, encode_cursor
from scheduler.cli.main import cli
from scheduler.client import ApiClient
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, Role
from scheduler.domain.jobspec import JobSpec
from scheduler.packaging import pack
from scheduler.services.jobs import submit_job
from tests import factories as f

MiB = 2**20
JOB: dict[str, Any] = {"name": "t", "model": "m:v1", "entrypoint": "python train.py"}


@pytest.fixture
def world(session_of) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Two providers with a site and a node each, a model version, a token per role."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, orion, "orion-1", gpus=2)
        f.node(s, vega, "vega-1", gpus=2)
        f.ensure_model_version(s, "m:v1")
        return {
            "admin": f.token(s, Role.admin),
            "engineer": f.token(s, Role.engineer),
            "partner": f.token(s, Role.partner_manager),
            "orion": f.token(s, Role.provider, "orion"),
        }


def call(server, token: str | None, method: str, path: str, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def _declare_only(server, token: str, path: str, length: int) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """PUT with a ``Content-Length`` of ``length`` and no body: what the server answers."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/zip\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"]


def _field_errors(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code == 422, resp.text
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in resp.json()["detail"]}


# --- the body limit ----------------------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_that_says_the_limit(server, world) -> None:  # type: ignore[no-untyped-def]
    big = {**JOB, "env": {"BLOB": "x" * (2 * MiB)}}
    resp = call(server, world["engineer"], "POST", "/v1/jobs", json=big)
    assert resp.status_code == 413
    detail = resp.json()["detail"]
    assert "is over the limit of 1048576 bytes (1 MiB) for POST /v1/jobs" in detail
    assert detail.startswith("request body of ")  # the size it was told in Content-Length


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server, world) -> None:  # type: ignore[no-untyped-def]
    sent = []

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "t", "model": "m:v1", "entrypoint": "'
        for _ in range(40):  # 2.5 MiB in all, without a Content-Length
            sent.append(1)
            yield b"x" * 65536
        yield b'"}'

    try:
        resp = call(
            server,
            world["engineer"],
            "POST",
            "/v1/jobs",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    except httpx.HTTPError as exc:  # pragma: no cover - the server may close mid-upload
        pytest.fail(f"the client should get the 413, not {exc!r}")
    assert resp.status_code == 413, resp.text
    assert resp.json()["detail"] == (
        "request body is over the limit of 1048576 bytes (1 MiB) for POST /v1/jobs"
    )


def test_a_body_under_the_limit_is_accepted(server, world) -> None:  # type: ignore[no-untyped-def]
    near = {**JOB, "entrypoint": "x" * 9_000, "env": {f"V{i}": "y" * 4_000 for i in range(100)}}
    resp = call(server, world["engineer"], "POST", "/v1/jobs", json=near)
    assert resp.status_code == 201, resp.text


def test_a_code_package_keeps_its_own_larger_limit(server, world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "weights.bin").write_bytes(os.urandom(5 * MiB))  # does not compress
    package = pack(tmp_path)
    assert package.size > 4 * MiB
    up = call(
        server,
        world["engineer"],
        "PUT",
        f"/v1/packages/{package.sha256}",
        content=package.data,
        headers={"content-type": "application/zip"},
    )
    assert up.status_code == 201, up.text
    assert up.json()["size_bytes"] == package.size
    status, detail = _declare_only(
        server, world["engineer"], f"/v1/packages/{'0' * 64}", 101 * MiB
    )  # a client that says how much it will send: refused before a byte of it is read
    assert status == 413
    assert "over the limit of 104857600 bytes (100 MiB)" in detail
    assert "leave data sets and checkpoints out of working_dir" in detail


def test_a_site_report_may_carry_more_than_other_bodies(server, world) -> None:  # type: ignore[no-untyped-def]
    """Output tails of every running worker: a report is allowed past 1 MiB."""
    tails = {str(a): {"0": "y" * 60_000} for a in range(1, 41)}  # about 2.4 MB
    resp = call(
        server,
        world["orion"],
        "POST",
        "/v1/sites/orion/report",
        json={"applied_version": 0, "logs": tails},
    )
    assert resp.status_code == 200, resp.text


class _Recorder:
    """An ASGI app that reads the whole body and answers 200, remembering that it ran."""

    def __init__(self) -> None:
        self.ran = 0

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        self.ran += 1
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"gone"})
                return
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("name", "method", "path", "size", "declared", "want"),
    [
        ("under the default", "POST", "/v1/jobs", 1000, True, 200),
        ("over the default, declared", "POST", "/v1/jobs", 1025, True, 413),
        ("over the default, streamed", "POST", "/v1/jobs", 1025, False, 413),
        ("a rule's larger limit", "PUT", "/v1/packages/abc", 3000, True, 200),
        ("over a rule's limit, streamed", "PUT", "/v1/packages/abc", 4097, False, 413),
        ("the rule is for its method only", "POST", "/v1/packages/abc", 3000, True, 413),
    ],
)
def test_the_middleware_applies_the_limit_of_each_route(
    name, method, path, size, declared, want
) -> None:  # type: ignore[no-untyped-def]
    inner = _Recorder()
    app = BodyLimit(inner, max_bytes=1024, rules=[BodyRule("PUT", r"/v1/packages/", 4096, "hint")])

    async def chunks() -> AsyncIterator[bytes]:
        yield b"z" * (size // 2)
        yield b"z" * (size - size // 2)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = b"z" * size if declared else chunks()
            return await http.request(method, path, content=body)

    resp = asyncio.run(send())
    assert resp.status_code == want, resp.text
    if want == 413:
        assert "over the limit of" in resp.json()["detail"]
        assert inner.ran == (0 if declared else 1)  # declared: the route never runs


@pytest.mark.parametrize(
    ("n", "text"), [(1048576, "1 MiB"), (2048, "2 KiB"), (1000, "1000 bytes"), (3 * 2**30, "3 GiB")]
)
def test_sizes_are_said_in_the_largest_whole_unit(n, text) -> None:  # type: ignore[no-untyped-def]
    assert describe_size(n) == text


# --- field limits ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "token", "path", "body", "field", "words"),
    [
        (
            "too many environment variables",
            "engineer",
            "/v1/jobs",
            {**JOB, "env": {f"V{i}": "x" for i in range(101)}},
            "env",
            "at most 100",
        ),
        (
            "an environment value too long",
            "engineer",
            "/v1/jobs",
            {**JOB, "env": {"BIG": "x" * 4097}},
            "env.BIG",
            "at most 4096",
        ),
        (
            "an environment name too long",
            "engineer",
            "/v1/jobs",
            {**JOB, "env": {"N" * 129: "x"}},
            f"env.{'N' * 129}.[key]",
            "at most 128",
        ),
        (
            "an entrypoint too long",
            "engineer",
            "/v1/jobs",
            {**JOB, "entrypoint": "x" * 10_001},
            "entrypoint",
            "at most 10000",
        ),
        (
            "a health reason too long",
            "orion",
            "/v1/nodes/orion-1/heartbeat",
            {"gpus": [{"uuid": "GPU-orion-1-0", "health_reasons": ["x" * 201]}]},
            "gpus.0.health_reasons.0",
            "at most 200",
        ),
        (
            "too many health reasons",
            "orion",
            "/v1/nodes/orion-1/heartbeat",
            {"gpus": [{"uuid": "GPU-orion-1-0", "health_reasons": ["x"] * 21}]},
            "gpus.0.health_reasons",
            "at most 20",
        ),
        (
            "a token's provider name too long",
            "admin",
            "/v1/tokens",
            {"name": "t", "role": "provider", "provider": "p" * 64},
            "provider",
            "at most 63",
        ),
        (
            "a site agent's details too long",
            "orion",
            "/v1/sites/orion/report",
            {"applied_version": 0, "agent": {"version": "v" * 501}},
            "agent.version",
            "at most 500",
        ),
    ],
)
def test_a_field_over_its_limit_is_a_422_naming_the_field(
    server, world, name, token, path, body, field, words
) -> None:  # type: ignore[no-untyped-def]
    errors = _field_errors(call(server, world[token], "POST", path, json=body))
    assert field in errors, errors
    assert words in errors[field]


def test_a_heartbeat_with_megabytes_of_health_reasons_is_refused(server, world) -> None:  # type: ignore[no-untyped-def]
    flood = {"gpus": [{"uuid": "GPU-orion-1-0", "health_reasons": ["x" * MiB] * 20}]}
    resp = call(server, world["orion"], "POST", "/v1/nodes/orion-1/heartbeat", json=flood)
    assert resp.status_code == 413


# --- cursors -----------------------------------------------------------------------------------
def _submit_many(session_of, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    spec = JobSpec.model_validate(JOB)
    now = utcnow()
    with session_of() as s:
        return [
            submit_job(s, spec=spec, owner="tester", now=now + timedelta(microseconds=i)).id  # type: ignore[misc]
            for i in range(n)
        ]


def _pages(
    server, token: str, path: str, **params: Any
) -> tuple[list[list[Any]], list[httpx.Response]]:  # type: ignore[no-untyped-def]
    pages, answers = [], []
    query = dict(params)
    while True:
        resp = call(server, token, "GET", path, params=query)
        assert resp.status_code == 200, resp.text
        pages.append(resp.json())
        answers.append(resp)
        cursor = resp.headers.get("x-next-cursor")
        if not cursor:
            return pages, answers
        query["cursor"] = cursor


def test_paging_through_1234_jobs_returns_each_exactly_once(server, world, session_of) -> None:  # type: ignore[no-untyped-def]
    ids = _submit_many(session_of, 1234)
    pages, answers = _pages(server, world["engineer"], "/v1/jobs", limit=100)
    assert [len(p) for p in pages] == [100] * 12 + [34]
    seen = [j["id"] for page in pages for j in page]
    assert seen == sorted(ids, reverse=True)  # newest first, each once
    first = answers[0]
    cursor = first.headers["x-next-cursor"]
    assert first.headers["link"] == (
        f'<{server.url}/v1/jobs?limit=100&cursor={cursor}>; rel="next"'
    )
    assert "x-next-cursor" not in answers[-1].headers and "link" not in answers[-1].headers
    followed = httpx.get(
        first.headers["link"][1:].split(">;")[0],
        headers={"Authorization": f"Bearer {world['engineer']}"},
    )
    assert followed.json() == pages[1]


def test_the_default_page_is_500_and_the_largest_5000(server, world, session_of) -> None:  # type: ignore[no-untyped-def]
    _submit_many(session_of, 501)
    default = call(server, world["engineer"], "GET", "/v1/jobs")
    assert len(default.json()) == 500 and default.headers.get("x-next-cursor")
    errors = _field_errors(
        call(server, world["engineer"], "GET", "/v1/jobs", params={"limit": 5001})
    )
    assert errors == {"limit": "must be at most 5000 (got '5001')"}


@pytest.mark.parametrize(
    ("name", "cursor"),
    [
        ("not base64 of anything", "%%%not-a-cursor"),
        ("base64 of something else", base64.urlsafe_b64encode(b"hello").decode()),
        ("a name cursor given to a list by id", encode_cursor("orion-1")),
        ("a cursor holding true", base64.urlsafe_b64encode(b'{"after": true}').decode()),
    ],
)
def test_a_bad_cursor_is_a_422_that_names_the_cursor(server, world, name, cursor) -> None:  # type: ignore[no-untyped-def]
    resp = call(server, world["engineer"], "GET", "/v1/jobs", params={"cursor": cursor})
    errors = _field_errors(resp)
    assert list(errors) == ["cursor"]
    assert errors["cursor"].startswith("is not a cursor of this list")


def test_a_cursor_round_trips_its_key() -> None:
    assert decode_cursor(encode_cursor(1234), int) == 1234
    assert decode_cursor(encode_cursor("vega-1"), str) == "vega-1"
    with pytest.raises(ValueError, match="is not a cursor of this list"):
        decode_cursor(encode_cursor(7), str)


@pytest.mark.parametrize(
    ("path", "token", "params", "key"),
    [
        ("/v1/jobs", "engineer", {}, "id"),
        ("/v1/nodes", "partner", {}, "name"),
        ("/v1/sites", "partner", {}, "name"),
        ("/v1/providers", "partner", {}, "name"),
        ("/v1/providers/nebula/agreements", "partner", {}, "id"),
        ("/v1/tokens", "admin", {}, "id"),
        ("/v1/models", "engineer", {}, "name"),
        ("/v1/statements", "partner", {"period": "2026-11"}, "provider"),
        ("/v1/reward-policies", "partner", {}, "version"),
    ],
)
def test_every_list_endpoint_pages_with_a_cursor(
    server, world, session_of, path, token, params, key
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        nebula = f.provider(s, "nebula", CommitmentLevel.committed)
        f.node(s, nebula, "nebula-1", gpus=1)
        from scheduler.services.providers import add_agreement

        add_agreement(s, provider=nebula, level=CommitmentLevel.spot, starts_at=utcnow())
        f.ensure_model_version(s, "other:v1")
        f.token(s, Role.engineer)
    _submit_many(session_of, 3)
    if path == "/v1/reward-policies":
        body = {"effective_from": "2030-01-01T00:00:00Z", "rates": {"api_usage": "0.12"}}
        assert call(server, world["admin"], "POST", path, json=body).status_code == 201
    whole = call(server, world[token], "GET", path, params={**params, "limit": 5000})
    assert whole.status_code == 200 and "x-next-cursor" not in whole.headers, whole.text
    everything = whole.json()
    assert len(everything) >= 2, everything
    pages, _ = _pages(server, world[token], path, **params, limit=1)
    assert [len(p) for p in pages] == [1] * len(everything)
    keys = [item[key] for item in everything]  # (a draft statement is recomputed per read)
    assert [item[key] for page in pages for item in page] == keys
    assert len(set(keys)) == len(keys)


def test_the_client_and_the_cli_list_everything_across_pages(
    server, world, session_of, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    ids = _submit_many(session_of, 1234)
    monkeypatch.setattr(client_module, "PAGE_SIZE", 100)
    with ApiClient(server.url, world["engineer"]) as api:
        assert [j.id for j in api.jobs(limit=None)] == sorted(ids, reverse=True)
        assert [j.id for j in api.jobs(limit=250)] == sorted(ids, reverse=True)[:250]
    monkeypatch.setattr(client_module, "PAGE_SIZE", 1)
    with ApiClient(server.url, world["partner"]) as api:
        assert [n.name for n in api.nodes()] == ["orion-1", "vega-1"]
    monkeypatch.setattr(client_module, "PAGE_SIZE", 100)
    env = {"ANDROMEDA_SERVER": server.url, "ANDROMEDA_TOKEN": world["engineer"]}
    listed = CliRunner().invoke(cli, ["jobs", "--all"], env=env)
    assert listed.exit_code == 0, listed.output
    shown = [line.split()[0] for line in listed.output.splitlines()[1:] if line.strip()]
    assert sorted(int(i) for i in shown) == sorted(ids)
    monkeypatch.setattr(client_module, "PAGE_SIZE", 1)
    env["ANDROMEDA_TOKEN"] = world["partner"]
    nodes = CliRunner().invoke(cli, ["nodes"], env=env)
    assert nodes.exit_code == 0, nodes.output
    assert "orion-1" in nodes.output and "vega-1" in nodes.output
    providers = CliRunner().invoke(cli, ["provider", "list"], env=env)
    assert "orion" in providers.output and "vega" in providers.output
