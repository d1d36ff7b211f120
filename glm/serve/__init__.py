"""`--run_mode serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the fine-tuned model.

    python run_glm.py --config CFG --run_mode serve --load_checkpoint W [--host 127.0.0.1] [--port 8000]

Routes: POST /v1/chat/completions (streaming or not, tools for GLM3), GET /v1/models, GET /health.
Messages are encoded in the prompt format the checkpoint was fine-tuned with (its meta), as predict and
eval do; `--prompt_format` / `prompt_format` overrides it (glm/prompt_format.py).
The model (base weights, or base + a LoRA adapter / P-Tuning prefix, through the same loading path as
predict) is compiled once before the port opens; SIGINT/SIGTERM stop taking requests, let running ones
finish (up to 30 s, then cancel them) and exit.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys

from glm import GLMError

GRACEFUL_SECONDS = 30


def serve_settings(cfg) -> dict:
    """The `serve` section with its derived defaults filled in (rows, model id)."""
    from glm.settings import as_run

    run = as_run(cfg)
    s = dataclasses.asdict(run.serve)
    s["batch_size"] = int(s["batch_size"] or run.runner_config.batch_size or 1)
    s["model_name"] = s["model_name"] or run.trainer.model_name or "glm"
    return s


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GLMError(f"serve: cannot listen on {host}:{port} ({e.strerror or e}); "
                       "pick another --port (0 = any free port) or --host") from None
    sock.listen(128)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which kills the process before the
        engine is closed; a stop by signal is the normal way to end a server, so it exits 0 instead."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server


def run_serve(cfg: dict) -> None:
    import uvicorn

    from glm.predict import _session
    from glm.serve.app import create_app
    from glm.serve.engine import Engine

    s = serve_settings(cfg)
    sock = _bind(s["host"], int(s["port"]))   # fail fast on a taken port, before minutes of loading
    print(f"loading {s['model_name']} (batch of {s['batch_size']})…", file=sys.stderr, flush=True)
    tok, generator, gen, fmt = _session(cfg, s["batch_size"], "serve")
    print(f"prompt format: {fmt}", file=sys.stderr, flush=True)
    generator.warm_up(gen)
    engine = Engine(tok, generator, s["max_queue"])
    engine.start()
    app = create_app(engine, s["model_name"], gen, fmt)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SECONDS,
                            access_log=False)
    server = _server_class()(config)
    print(f"serving {s['model_name']} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(timeout=5)
        print("server stopped", file=sys.stderr, flush=True)
