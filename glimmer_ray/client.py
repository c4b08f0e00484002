"""Python clients of the GLIMMER Serve app: over HTTP, or through a Serve handle inside the cluster.

    from glimmer_ray.client import GlimmerClient
    client = GlimmerClient("http://127.0.0.1:8000")
    result = client.answer("what is the capital of Kraxbrath", task="nq", top_k=10)
    print(result.answer, [p.title for p in result.passages if p.selected])

Both clients return the same typed `AnswerResponse` and raise `GlimmerAPIError` (with the HTTP status
and the app's message) for requests the app refuses.
"""

from __future__ import annotations

from typing import Any

import requests

from glimmer_ray.serving import AnswerRequest, AnswerResponse


class GlimmerAPIError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class _AnswerClient:
    """`answer` for both transports: the request body the API takes, the typed response it returns."""

    def answer(
        self,
        question: str,
        task: str | None = None,
        top_k: int | None = None,
        num_selected: int | None = None,
        max_new_tokens: int | None = None,
    ) -> AnswerResponse:
        fields = {
            "question": question,
            "task": task,
            "top_k": top_k,
            "num_selected": num_selected,
            "max_new_tokens": max_new_tokens,
        }
        return AnswerResponse.model_validate(
            self._answer({key: value for key, value in fields.items() if value is not None})
        )

    def _answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class GlimmerClient(_AnswerClient):
    """HTTP client: `POST /v1/answer`, `POST /v1/answer:batch`, `GET /healthz`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 120.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.session = requests.Session()

    def _post(self, path: str, body: Any) -> Any:
        response = self.session.post(f"{self.base_url}{path}", json=body, timeout=self.timeout)
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise GlimmerAPIError(response.status_code, message)
        return response.json()

    def _answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/answer", payload)

    def answer_batch(self, requests_: list[AnswerRequest | dict[str, Any]]) -> list[AnswerResponse]:
        body = {"requests": [r.model_dump(exclude_none=True) if isinstance(r, AnswerRequest) else r for r in requests_]}
        return [AnswerResponse.model_validate(item) for item in self._post("/v1/answer:batch", body)]

    def health(self) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/healthz", timeout=self.timeout)
        if response.status_code != 200:
            raise GlimmerAPIError(response.status_code, response.text)
        return response.json()


class GlimmerHandleClient(_AnswerClient):
    """In-cluster client through `serve.get_app_handle` (no HTTP); same results and errors."""

    def __init__(self, app_name: str = "glimmer") -> None:
        from ray import serve

        self.handle = serve.get_app_handle(app_name)

    def _answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        reply = self.handle.answer_payload.remote(payload).result()
        if reply["status"] != 200:
            raise GlimmerAPIError(reply["status"], reply["error"])
        return reply["body"]
