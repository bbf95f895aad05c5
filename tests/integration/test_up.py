"""The README's first command: `cluster up` starts everything, answers, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import yaml

from cluster.tools.redis_server import free_port
from tests.integration.conftest import tiny_spec


def test_cluster_up_serves_then_stops_cleanly_on_ctrl_c(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    deployments = tmp_path / "deployments"
    deployments.mkdir()
    spec = tiny_spec("demo/tiny", tiny_model).model_dump(mode="json")
    (deployments / "tiny.yaml").write_text(yaml.safe_dump(spec))
    port = free_port()
    env = os.environ | {"CLUSTER_DEPLOYMENTS_DIR": str(deployments), "CLUSTER_PORT": str(port),
                        "COLUMNS": "200"}
    env.pop("CLUSTER_REDIS_URL", None)  # `up` starts its own Redis
    proc = subprocess.Popen([sys.executable, "-m", "cluster.tools.cli", "up"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            output.append(line)
            if "Ctrl-C stops everything" in line or not line:
                break
        text = "".join(output)
        assert "Ready in" in text, text[-3000:]
        key = re.search(r"API key\s+(sk-\S+)", text)
        assert key, text[-3000:]
        assert f"http://127.0.0.1:{port}/v1/openai" in text
        assert re.search(r"Limits\s+1,000 requests/min", text), text[-3000:]
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1/openai",
                            api_key=key.group(1), max_retries=0)
        chunks = list(sdk.chat.completions.create(
            model="demo/tiny", max_tokens=4, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}]))
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-3000:]
    assert "Stopped." in rest
