"""A small typed client of the REST API, used by the CLI, the agent and the demo.

HTTP goes through an ``httpx`` transport, so tests can hand in the real app
(``httpx.ASGITransport``) or a real server URL alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from scheduler.domain.explain import format_errors
from scheduler.schemas import (
    EvidenceAck,
    EvidenceBatch,
    Heartbeat,
    HeartbeatAck,
    JobDetail,
    JobLogs,
    JobPublic,
    NodePublic,
    NodeRegister,
    NodeRegistered,
    SiteAssignments,
    SitePublic,
    SiteReport,
    SiteReportResult,
    UsageReport,
)

PAGE_SIZE = 5000
"""Items asked for per page when following a list's cursor: the most the server gives."""


class ApiError(Exception):
    """The server answered with an error; ``str()`` is a readable one-line summary."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    """FastAPI's ``[{loc, msg}]`` lists become ``field: problem; field: problem``."""
    if isinstance(detail, list):
        return format_errors(d if isinstance(d, dict) else {"msg": str(d)} for d in detail)
    return str(detail)


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text or response.reason_phrase


class ApiClient:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        on_response: Callable[[float, float, httpx.Response], None] | None = None,
    ) -> None:
        """``on_response(sent_s, received_s, response)`` is called for every answer, errors
        included (wall-clock seconds): the agent reads the server's clock from it."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )
        self.on_response = on_response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if method == "HEAD" or not response.content:
            return None
        return response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request; ``ApiError`` when it is an error."""
        sent = time.time()
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach {self._http.base_url}: {exc}") from exc
        if self.on_response is not None:
            self.on_response(sent, time.time(), response)
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response

    def list_all(
        self, path: str, *, params: dict[str, Any] | None = None, limit: int | None = None
    ) -> list[Any]:
        """Every item of a list endpoint (``limit``: only the first that many), page after
        page: each page's ``X-Next-Cursor`` header says where the next one starts
        (``scheduler/api/paging.py``); the last page has none."""
        items: list[Any] = []
        query = dict(params or {})
        while True:
            size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(items))
            response = self._send("GET", path, params={**query, "limit": size})
            page = response.json()
            items.extend(page)
            cursor = response.headers.get("x-next-cursor")
            if not cursor or not page or (limit is not None and len(items) >= limit):
                return items
            query["cursor"] = cursor

    # --- jobs -------------------------------------------------------------------------------
    def submit(
        self,
        spec: dict[str, Any],
        *,
        allow_unknown_model: bool = False,
        allow_oversize: bool = False,
    ) -> JobDetail:
        params = {
            k: "true"
            for k, v in (
                ("allow_unknown_model", allow_unknown_model),
                ("allow_oversize", allow_oversize),
            )
            if v
        }
        return JobDetail.model_validate(self.request("POST", "/v1/jobs", json=spec, params=params))

    def jobs(self, *, status: str | None = None, limit: int | None = 100) -> list[JobPublic]:
        """The newest ``limit`` jobs (None: every one), newest first."""
        params = {"status": status} if status else {}
        rows = self.list_all("/v1/jobs", params=params, limit=limit)
        return [JobPublic.model_validate(j) for j in rows]

    def job(self, job_id: int) -> JobDetail:
        return JobDetail.model_validate(self.request("GET", f"/v1/jobs/{job_id}"))

    def logs(self, job_id: int) -> JobLogs:
        return JobLogs.model_validate(self.request("GET", f"/v1/jobs/{job_id}/logs"))

    def cancel(self, job_id: int) -> JobDetail:
        return JobDetail.model_validate(self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    # --- nodes ------------------------------------------------------------------------------
    def register_node(self, body: NodeRegister) -> NodeRegistered:
        data = self.request("POST", "/v1/nodes/register", json=body.model_dump(mode="json"))
        return NodeRegistered.model_validate(data)

    def heartbeat(self, name: str, body: Heartbeat) -> HeartbeatAck:
        data = self.request(
            "POST", f"/v1/nodes/{name}/heartbeat", json=body.model_dump(mode="json")
        )
        return HeartbeatAck.model_validate(data)

    def post_evidence(self, name: str, body: EvidenceBatch) -> EvidenceAck:
        data = self.request("POST", f"/v1/nodes/{name}/evidence", json=body.model_dump(mode="json"))
        return EvidenceAck.model_validate(data)

    def nodes(self) -> list[NodePublic]:
        return [NodePublic.model_validate(n) for n in self.list_all("/v1/nodes")]

    def sites(self) -> list[SitePublic]:
        return [SitePublic.model_validate(s) for s in self.list_all("/v1/sites")]

    def remove_node(self, name: str) -> NodePublic:
        return NodePublic.model_validate(self.request("DELETE", f"/v1/nodes/{name}"))

    def set_node_status(
        self,
        name: str,
        status: str,
        reason: str | None = None,
        *,
        notice_s: int | None = None,
        let_finish: bool = False,
    ) -> NodePublic:
        body: dict[str, object] = {"status": status, "reason": reason}
        if notice_s is not None:
            body["notice_s"] = notice_s
        if let_finish:
            body["let_finish"] = True
        return NodePublic.model_validate(
            self.request("POST", f"/v1/nodes/{name}/status", json=body)
        )

    # --- sites and packages -----------------------------------------------------------------
    def site_assignments(self, site: str, *, after: int = -1, wait: float = 0) -> SiteAssignments:
        """A long poll when ``wait`` > 0: answers once the version exceeds ``after``."""
        data = self.request(
            "GET",
            f"/v1/sites/{site}/assignments",
            params={"after": after, "wait": wait},
            timeout=wait + 30,
        )
        return SiteAssignments.model_validate(data)

    def site_report(self, site: str, report: SiteReport) -> SiteReportResult:
        data = self.request("POST", f"/v1/sites/{site}/report", json=report.model_dump(mode="json"))
        return SiteReportResult.model_validate(data)

    def package_exists(self, sha256: str) -> bool:
        try:
            self.request("HEAD", f"/v1/packages/{sha256}")
        except ApiError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def upload_package(self, sha256: str, data: bytes) -> None:
        self.request(
            "PUT",
            f"/v1/packages/{sha256}",
            content=data,
            headers={"content-type": "application/zip"},
            timeout=300,
        )

    def download_package(self, sha256: str) -> bytes:
        try:
            response = self._http.get(f"/v1/packages/{sha256}", timeout=300)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach {self._http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response.content

    # --- usage, providers, tokens ----------------------------------------------------------
    def usage(
        self, *, start: datetime | None = None, end: datetime | None = None, by: str = "provider"
    ) -> UsageReport:
        params = {"by": by}
        if start:
            params["start"] = start.isoformat()
        if end:
            params["end"] = end.isoformat()
        return UsageReport.model_validate(self.request("GET", "/v1/usage", params=params))
