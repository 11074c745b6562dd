"""softalign's bridge to the official W&B client.

Written into the run folder and run as `python -u wandb_bridge.py` by the Rust trainer, which
feeds it one JSON object per line on stdin:
  {"init": {...wandb.init keyword arguments...}}   first line
  {"step": N, "values": {...}}                      -> wandb.log(values, step=N)
  {"finish": true}                                  -> wandb.finish(), exit 0
Replies go to stdout as lines starting with "SOFTALIGN_BRIDGE ". Exit code 3 means the wandb
package cannot be imported.
"""
import json
import signal
import sys

MISSING_CLIENT = 3


def reply(msg):
    sys.stdout.write("SOFTALIGN_BRIDGE " + msg + "\n")
    sys.stdout.flush()


def main():
    # The trainer decides when this bridge ends: on Ctrl-C or a cluster's SIGTERM / SIGUSR1
    # (which reach the whole process group or job step) it finishes its step, checkpoints and
    # then closes stdin; if it dies instead, stdin's end of input ends the bridge.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        import wandb
    except ImportError as e:
        sys.stderr.write("softalign wandb bridge: cannot import wandb: %s\n" % e)
        sys.stderr.flush()
        return MISSING_CLIENT
    first = sys.stdin.readline()
    if not first:
        return 0
    init = json.loads(first)["init"]
    run = wandb.init(**init)
    reply("ready")
    finished = False
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("finish"):
            finished = True
            break
        values = {k: (float("nan") if v is None else v) for k, v in msg["values"].items()}
        wandb.log(values, step=int(msg["step"]))
    # End of input without "finish" (the trainer died): close the run all the same.
    if run is not None:
        run.finish()
    else:
        wandb.finish()
    reply("finished" if finished else "closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
