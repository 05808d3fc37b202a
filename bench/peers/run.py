"""The peers' command line, in their environment: ``python -m bench.peers.run enqueue PEER TASK
COUNT [PRIORITY]`` prints the rate as JSON; ``worker PEER`` runs the peer's worker."""

import importlib
import json
import os
import sys


def main() -> None:
    action, peer = sys.argv[1], sys.argv[2]
    module = importlib.import_module(f"bench.peers.{peer}_peer")
    if action == "enqueue":
        task, count = sys.argv[3], int(sys.argv[4])
        priority = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        print(json.dumps({"rate": module.enqueue(count, task, priority)}))
    elif action == "worker":
        command = module.WORKER
        tool = os.path.join(os.path.dirname(sys.executable), command[0])
        os.execv(tool, command)  # noqa: S606 -- the peer's own command, from this environment
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main()
