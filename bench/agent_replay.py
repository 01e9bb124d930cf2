"""Replay issue 14's scenario as a new agent would (fresh zoo, protocol only) and print each call with a
short digest of its answer. Not a test: a record of what the protocol says, for the closing note.

    python -m bench.agent_replay /tmp/replay-zoo   # a fresh directory; uses the process sandbox and digits
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
from mcp import Client

from lemur_agent_server.config import Settings
from lemur_agent_server.reference_models import read_code
from lemur_agent_server.server import build_server


def digest(value: object, cap: int = 700) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= cap else text[:cap] + f"... ({len(text):,} chars)"


async def replay(root: Path) -> None:
    settings = Settings.from_env(root / "zoo.sqlite", data_root=Path("data"), sandbox="process")
    settings.threads = 2
    async with Client(build_server(settings)) as client:
        async def call(tool: str, **args: object) -> dict:
            res = await client.call_tool(tool, args)
            out = res.structured_content if not res.is_error else {"error": res.content[0].text}
            print(f"\n>>> {tool}({digest(args, 200)})\n{digest(out)}")
            return out

        cat = await call("list_catalog")
        print("baselines:", digest(cat.get("baselines")))
        await call("query_models", view="models", dataset="Fashion-MNIST")
        await call("get_model", name="lenet5", include_code=False)
        prompt = await client.get_prompt("design_model", {})
        print("\n>>> design_model()\n" + prompt.messages[0].content.text.split("\n")[0])
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            base = (await client.call_tool("list_catalog", {})).structured_content["baselines"]
            if base and base["ready"].startswith("done"):
                break
            await anyio.sleep(5)
        await call("list_catalog")
        await call("leaderboard", dataset="digits")
        code = read_code("LeNet5").replace("nn.Linear(120, 84)", "nn.Linear(120, 64)").replace(
            "nn.Linear(84,", "nn.Linear(64,")
        checked = await call("check_model", code=code, dataset="digits", prm={"batch": 32})
        print("speed:", digest(checked.get("speed")), "\nlayers:", digest(checked.get("layers"), 500))
        job = await call("submit_model", code=code, dataset="digits", n_trials=1, epochs=3, time_budget_s=60,
                         prm={"lr": 0.05, "momentum": 0.9, "batch": 32}, name_prefix="replay")
        while not job.get("done"):
            job = await call("get_job", job_id=job["job_id"], wait_s=30)
        print("standing:", digest(job.get("standing")), "notes:", digest(job.get("notes")))
        result = job.get("result") or {}
        for key in ("timing", "flags", "curve", "isolation", "trials"):
            print(f"{key}:", digest(result.get(key), 600))
        await call("leaderboard", dataset="digits", by="accuracy_to_time")
        again = await call("submit_model", code=read_code("LeNet5"), dataset="digits", n_trials=1, epochs=0.5,
                           time_budget_s=60, name_prefix="mine")
        while not again.get("done"):
            again = await call("get_job", job_id=again["job_id"], wait_s=30)
        print("notes:", digest(again.get("notes")))
        await call("submit_model", code=code, dataset="digits", prm={"lr": 3})
        unknown = await call("submit_model", code=code, dataset="digits", prm={"foo": 0.5}, time_budget_s=60)
        while not unknown.get("done"):
            unknown = await call("get_job", job_id=unknown["job_id"], wait_s=30)
        undeclared = code.replace("super().__init__()", "super().__init__()\n        self.p = prm['dropout']", 1)
        failed = await call("check_model", code=undeclared, dataset="digits")
        print("problem:", digest({k: v for k, v in (failed.get("problems") or [{}])[0].items() if k != "traceback"}))
        res = await client.call_tool("plot", {"kind": "accuracy_vs_time", "dataset": "digits"})
        print("\n>>> plot(kind='accuracy_vs_time')\n" + " ".join(c.text for c in res.content if c.type == "text")[:500])


if __name__ == "__main__":
    anyio.run(replay, Path(sys.argv[1]))
