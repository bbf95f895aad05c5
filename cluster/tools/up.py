"""``cluster up``: prepare the local models, start the stack, print how to call it, and stop
everything cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from rich.console import Console

from cluster.config.catalog import ModelSpec, load_catalog
from cluster.config.settings import Settings
from cluster.gate.keys import CreatedKey, KeyLimits, create_key_now
from cluster.tools.stack import LocalStack, pick_port

console = Console()


def _step(message: str) -> None:
    console.print(f"[bold cyan]>[/] {message}")


def prepare_models(specs: list[ModelSpec], settings: Settings) -> None:
    """Build the built-in checkpoints now, with progress (replicas never build them)."""
    from cluster.tools import builtin_models

    with console.status("Preparing the built-in models (first run: download + convert, "
                        "~1 min)"):
        builtin_models.prepare_models(specs, settings.cache_dir, progress=_step)


# The session key's limits: a local benchmark (vLLM's client at concurrency 16-32, hundreds
# of requests a minute) runs under them, and they are still checked on every request.
DEV_KEY_LIMITS = KeyLimits(rpm=1_000, tpm=2_000_000, max_concurrent=64)


def create_dev_key(redis_url: str) -> CreatedKey:
    """A fresh key for this session, so the snippet below works as printed."""
    return create_key_now(redis_url, "local-dev", DEV_KEY_LIMITS)


def limits_line(limits: KeyLimits) -> str:
    return (f"{limits.rpm:,} requests/min, {limits.tpm:,} tokens/min, "
            f"{limits.max_concurrent} concurrent (enforced; a 429 names the limit it hit)")


def snippet(base_url: str, key: CreatedKey, model: str) -> str:
    return f"""[bold]Base URL[/]  {base_url}/v1/openai   (also {base_url}/v1)
[bold]API key[/]   {key.secret}   (id {key.record.key_id})
[bold]Limits[/]    {limits_line(key.record.limits)}

curl {base_url}/v1/openai/chat/completions \\
  -H "Authorization: Bearer {key.secret}" -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "temperature": 0,
       "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base_url}/v1/openai", api_key="{key.secret}")
# temperature 0: a 135M model answers best greedily
stream = client.chat.completions.create(model="{model}", stream=True, temperature=0,
    messages=[{{"role": "user", "content": "What is the capital of France?"}}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)
print()
PY"""


def ray_access(stack: LocalStack) -> str:
    """How to reach Ray itself: everything listens on 127.0.0.1 and asks for the token."""
    env = " ".join(f"{k}={v}" for k, v in stack.ray_client_env().items())
    return f"""
[bold]Ray[/]       dashboard {stack.dashboard_url} (paste the token from {stack.ray_token_path})
          every port on 127.0.0.1; Ray's APIs refuse a client without the token:
          {env} serve status"""


def run_up(settings: Settings) -> None:
    started = time.monotonic()
    specs = load_catalog(settings.deployments_dir, settings.profile)
    _step(f"Profile '{settings.profile}': serving {', '.join(s.id for s in specs)}")
    prepare_models(specs, settings)
    stack = LocalStack(specs, settings, port=pick_port(settings.port))
    stop = threading.Event()
    try:
        stack.start(progress=_step)
        _install_signal_handlers(stop)  # after ray.init, which replaces SIGTERM's handler
        with console.status("Waiting for every model to have a running replica"):
            stack.wait_healthy()
        assert stack.redis_url is not None
        key = create_dev_key(stack.redis_url)
        console.rule(f"Ready in {time.monotonic() - started:.0f} s")
        console.print(snippet(stack.base_url, key, specs[0].id), soft_wrap=True,
                      highlight=False)
        console.print(ray_access(stack), soft_wrap=True, highlight=False)
        console.rule("Ctrl-C stops everything")
        stop.wait()
    finally:
        with console.status("Stopping Serve, Ray and Redis"):
            stack.stop()
        _step("Stopped.")


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
