"""The `agentprm` command line: serve, score, model {init-random, verify, list, import, export}, and subcommands that other
packages register (`train` from training.cli, `rollout`/`eval` from envs.cli, `bench` from bench.cli).

Errors a user can cause (bad paths, bad checkpoints, bad input files) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shlex
import sys
from pathlib import Path

from model_store.store import CheckpointError
from service.engine.types import AGGREGATES, DEFAULT_AGGREGATE, DEFAULT_MODEL_ALIAS

PLUGINS = ("training.cli", "envs.cli", "bench.cli")
# model_store.importers.KINDS, written here too so `--help` does not import torch.
IMPORT_KINDS = ("qwen-prm", "skywork", "trl", "openrlhf", "trl-prm", "seq-cls", "math-shepherd", "rlhflow")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit code 2, like every
    other error a user can cause."""

    def error(self, message: str):
        self.exit(2, f"agentprm: error: {message} (see '{self.prog} --help')\n")


def _settings_from_args(args) -> "ServerSettings":
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.settings import ServerSettings, settings_error

    fields = ServerSettings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        raise UserError(settings_error(exc, set(overrides))) from None
    except SettingsError as exc:  # an environment variable pydantic-settings could not even parse
        raise UserError(f"invalid setting: {exc}") from None


def resolve_model(ref: str, store: str | None) -> tuple[Path, tuple[str, ...]]:
    """The checkpoint a user's reference names, and the names requests may use for it: 'default', the
    reference exactly as typed, and for a store reference both `name` and `name:version` of the folder it
    resolved to (whatever name the manifest records). `default` names the default model."""
    from model_store.manifest import MANIFEST_FILE
    from model_store.store import resolve_checkpoint
    from service.settings import DEFAULT_MODEL

    typed = str(ref)
    is_path = (Path(typed).expanduser() / MANIFEST_FILE).is_file()
    if typed == "default" and not is_path:
        ref = DEFAULT_MODEL
    path = resolve_checkpoint(ref, store)
    aliases = ["default", typed]
    if not is_path:
        aliases += [path.parent.name, f"{path.parent.name}:{path.name}"]
    return path, tuple(dict.fromkeys(aliases))


def _add_server_flags(p: argparse.ArgumentParser, serve: bool = True) -> None:
    from service.settings import SERVE_ONLY, ServerSettings

    for name, field in ServerSettings.model_fields.items():
        if name in SERVE_ONLY and not serve:
            continue
        flag = f"--{name.replace('_', '-')}"
        default = field.default if field.default_factory is None else field.default_factory()
        help_ = f"{field.description or name} [env AGENTPRM_{name.upper()}; default {default}]"
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif name == "api_key":
            p.add_argument(flag, action="append", default=None, metavar="KEY", help=help_)
        else:
            kind = field.annotation if field.annotation in (int, float) else str
            p.add_argument(flag, type=kind, default=None, help=help_)


def build_engine(settings):
    import dataclasses

    from service.engine.engine import PRMEngine

    path, aliases = resolve_model(settings.model, settings.store)
    engine = PRMEngine.from_checkpoint(path, settings.engine_config())
    engine.info = dataclasses.replace(engine.info, aliases=aliases)
    return engine


def check_config(settings) -> int:
    """`serve --check-config`: every setting, the key file and the checkpoint's checksums, without loading
    the model or binding the port. Exit 0 and one line when all is well; errors exit 2 as usual."""
    from model_store.store import verify_checkpoint

    try:
        keys = settings.api_keys()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    path, aliases = resolve_model(settings.model, settings.store)
    manifest = verify_checkpoint(path)
    print(f"agentprm: config ok: would serve {manifest.ref} from {path} (also as {', '.join(aliases)}) on "
          f"http://{settings.host}:{settings.port}, device {settings.device}, "
          f"auth {'on' if keys else 'off'}")
    return 0


def cmd_serve(args) -> int:
    """Verify and load the checkpoint (all or nothing: refused before the port is bound), bind the port, then
    announce and serve until drained (exit 0), the engine dies (3), the drain times out (4) or a second
    signal forces the stop (5); see service.api.server. A port that cannot be bound exits 1."""
    import logging

    from service import logs

    settings = _settings_from_args(args)
    if args.check_config:  # before the HTTP stack is imported: a check takes a fraction of a second
        return check_config(settings)

    from service.api.app import ApiConfig, create_app
    from service.api.server import EXIT_START_FAILED, BindError, bind_socket, serve
    from service.engine.vllm_server import VllmStartError

    logs.configure(settings.log_level, settings.log_format)
    log = logging.getLogger("agentprm.server")
    try:
        api_config = ApiConfig.from_settings(settings)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        engine = build_engine(settings)
    except VllmStartError as exc:  # --backend vllm: vLLM's own reason, one line, before our port is bound
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    try:  # bind before announcing: a port in use is one line and exit 1, never a banner then errno text
        sock = bind_socket(settings.host, settings.port)
    except BindError as exc:
        engine.close()  # a vLLM server started for this engine stops with it
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    port = sock.getsockname()[1]  # the real port, also when --port 0 let the system pick one
    if not api_config.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who can reach the port can use it "
                    "(set --api-key-file or AGENTPRM_API_KEY)", settings.host)
    where = f"vllm on {engine.device.type}" if settings.backend == "vllm" else f"device {engine.device}"
    banner = (f"serving {engine.info.ref} on http://{settings.host}:{port} ({where}, "
              f"dtype {engine.dtype.name} ({engine.dtype.reason}), "
              f"max_batch_tokens {settings.max_batch_tokens}, max_wait_ms {settings.max_wait_ms}, "
              f"auth {'on' if api_config.api_keys else 'off'})")
    if settings.log_format == "json":
        log.warning(banner, extra={"event": "start"})
    else:
        print(f"agentprm: {banner}", flush=True)
    app = create_app(engine, engine.metrics, api_config)
    return serve(app, settings.host, port, settings.log_level, settings.drain_timeout_s, settings.keep_alive_s,
                 sock=sock)


def _read_jsonl_trajectories(path: Path):
    from pydantic import ValidationError

    from service.api.protocol import TrajectoryIn

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    out = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line.strip())  # stripped: a column past the line's end would read as "line 2"
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            try:
                out.append(TrajectoryIn.model_validate(raw).to_engine())
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "trajectory"
                raise UserError(f"{path}:{line_no}: {where}: {err['msg']}") from None
            if not out[-1].steps:
                raise UserError(f"{path}:{line_no}: trajectory has no steps")
    return out


def cmd_score(args) -> int:
    from tqdm import tqdm

    settings = _settings_from_args(args)
    trajectories = _read_jsonl_trajectories(Path(args.file))
    from service.engine.vllm_server import VllmStartError

    try:
        engine = build_engine(settings)
    except VllmStartError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 1
    out = open(args.out, "w") if args.out else sys.stdout

    async def run():
        await engine.start()
        try:
            chunk = max(1, args.chunk)
            with tqdm(total=len(trajectories), unit="traj", disable=args.out is None, desc="scoring") as bar:
                for start in range(0, len(trajectories), chunk):
                    part = trajectories[start:start + chunk]
                    result = await engine.score(DEFAULT_MODEL_ALIAS, part, args.aggregate)
                    for r in result.results:
                        out.write(json.dumps({"score": r.score, "initial_value": r.initial_value,
                                              "steps": [{"promise": s.promise, "progress": s.progress}
                                                        for s in r.steps]}) + "\n")
                    bar.update(len(part))
        finally:
            await engine.shutdown()

    try:
        asyncio.run(run())
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_model_init_random(args) -> int:
    if Path(args.out).exists() and not args.overwrite:  # before torch and transformers load: fails at once
        raise UserError(f"{args.out} already exists (pass --overwrite to replace it)")
    from model_store.export import init_random

    command = "agentprm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        manifest = init_random(args.out, name=args.name, version=args.version, layers=args.layers,
                               hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                               intermediate=args.intermediate, vocab=args.vocab, max_seq_len=args.max_seq_len,
                               seed=args.seed, overwrite=args.overwrite, command=command)
    except FileExistsError:
        raise UserError(f"{args.out} already exists (pass --overwrite to replace it)") from None
    print(f"wrote {manifest.ref} to {args.out} ({len(manifest.files)} files)")
    return 0


def cmd_model_verify(args) -> int:
    from model_store.modeling import load_prm

    path, _ = resolve_model(args.path, args.store)
    loaded = load_prm(path)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"ok: {loaded.manifest.ref} at {path}: {len(loaded.manifest.files)} files verified, "
          f"{params:,} parameters, max_seq_len {loaded.manifest.max_seq_len}")
    return 0


def cmd_model_list(args) -> int:
    from model_store.store import ModelStore

    store = ModelStore(args.store)
    entries = store.entries()
    if not entries:
        print(f"no checkpoints in {store.root}")
        return 0
    for e in entries:
        print(f"{e.name}:{e.version}\t{e.manifest.training.method}\t{e.manifest.created_at}\t{e.path}")
    return 0


def cmd_model_import(args) -> int:
    from model_store.importers import import_value_model

    try:
        done = import_value_model(args.src, args.out, name=args.name, version=args.version, kind=args.kind,
                                  activation=args.activation, max_seq_len=args.max_seq_len,
                                  overwrite=args.overwrite, step_separator=args.step_separator,
                                  system_prompt=args.system_prompt)
    except FileExistsError:
        raise UserError(f"{args.out} already exists (pass --overwrite to replace it)") from None
    m = done.manifest
    head = m.value_head
    print(f"{'detected' if done.detected else 'forced'} kind {done.kind}: {done.reason}")
    norm = f", normalisation (x - {head.normalisation.mean}) / {head.normalisation.std}" if head.normalisation else ""
    tokens = f", tokens {head.tokens}" if head.tokens else ""
    print(f"head: {head.kind} ({head.out_features} output(s){tokens}), activation {head.activation}{norm}")
    if m.template.kind == "native":
        t = m.template
        print(f"template: native ({t.family}): preamble {t.preamble!r}, task {t.task_format!r} + {t.task_suffix!r}, "
              f"steps {t.first_step_format!r} / {t.step_prefix!r} + {t.step_format!r}, readout at the last token "
              f"of {t.step_tag!r}, then {t.step_suffix!r}")
        print(f"tokenization: {done.tokenization_check}")
    else:
        print("template: marker (ours): the head has never seen it; fine-tune before trusting its scores")
    print(f"imported {args.src} as {m.ref} ({m.training.method}) to {args.out}")
    return 0


def cmd_model_export(args) -> int:
    from model_store.vllm_export import VllmExportError, export_for_vllm, vllm_serve_command

    path, _ = resolve_model(args.checkpoint, args.store)
    try:
        exported = export_for_vllm(path, args.out, arch=args.arch, overwrite=args.overwrite)
    except FileExistsError:
        raise UserError(f"{args.out} already exists (pass --overwrite to replace it)") from None
    except (VllmExportError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {exported.path} ({exported.architecture}; step tag id {exported.end_id})")
    print("serve it with:")
    print("  " + vllm_serve_command(exported))
    if _template_kind(path) == "native":
        print(f"note: STEP pooling returns a row at every token {exported.end_id}; where the step tag is ordinary "
              "text (a newline, a chat header) it also occurs outside the step tags our renderer placed: our "
              "steps' promises are the rows at the rendered readouts "
              "(model_store.vllm_export.step_rows_at_readouts)")
    return 0


def _template_kind(path) -> str:
    """The checkpoint's template kind (marker | native), from its manifest."""
    from model_store.store import read_manifest

    return read_manifest(path).template.kind


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="agentprm", description="AgentPRM Serve: train, store and serve PRMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP")
    _add_server_flags(p)
    p.add_argument("--check-config", action="store_true",
                   help="check every setting, the API key file and the checkpoint's checksums, print one line "
                        "and exit (0: all good, 2: what is wrong) without loading the model or binding the port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score a JSONL file of trajectories offline with the serving engine")
    p.add_argument("file", help="JSONL, one {task, steps: [{observation, action}]} per line")
    p.add_argument("--out", help="output JSONL (default: stdout)")
    p.add_argument("--aggregate", default=DEFAULT_AGGREGATE, choices=AGGREGATES)
    p.add_argument("--chunk", type=int, default=64, help="trajectories per engine call")
    _add_server_flags(p, serve=False)
    p.set_defaults(func=cmd_score)

    model = sub.add_parser("model", help="checkpoint tools").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("init-random", help="write a complete random checkpoint (tests, development)")
    p.add_argument("out", help="checkpoint folder to write (STORE/NAME/VERSION to serve it by name)")
    p.add_argument("--name", default="random-prm", help="model name in the manifest [default: %(default)s]")
    p.add_argument("--version", default="1", help="model version in the manifest [default: %(default)s]")
    p.add_argument("--layers", type=int, default=2, help="Qwen2 decoder layers [default: %(default)s]")
    p.add_argument("--hidden", type=int, default=64, help="hidden size [default: %(default)s]")
    p.add_argument("--heads", type=int, default=4, help="attention heads [default: %(default)s]")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA) [default: %(default)s]")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width [default: 2 x hidden]")
    p.add_argument("--vocab", type=int, default=512, help="byte-level BPE vocabulary size [default: %(default)s]")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence served [default: %(default)s]")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights [default: %(default)s]")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_model_init_random)
    p = model.add_parser("verify", help="check a checkpoint's checksums, schema and tensor shapes")
    p.add_argument("path", help="checkpoint path or name[:version]")
    p.add_argument("--store", default=None)
    p.set_defaults(func=cmd_model_verify)
    p = model.add_parser("import", help="convert a Hugging Face reward / process-reward model (README: 'Serving "
                                        "public PRMs')")
    p.add_argument("src", help="Hugging Face folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("out")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="1")
    p.add_argument("--kind", default="auto", choices=["auto", *IMPORT_KINDS],
                   help="the source's family (default: detected from its tensor names and config)")
    p.add_argument("--activation", default=None, choices=["sigmoid", "identity"],
                   help="default: identity for trl, sigmoid for every other kind")
    p.add_argument("--step-separator", default="\n", help="trl-prm: the PRMTrainer step_separator [default: newline]")
    p.add_argument("--system-prompt", default=None,
                   help="qwen-prm: the system turn [default: Qwen2.5-Math-PRM's own]")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_model_import)
    p = model.add_parser("export", help="write a checkpoint in another runtime's format (vLLM) and print how to "
                                        "serve it")
    p.add_argument("checkpoint", help="checkpoint path or name[:version]")
    p.add_argument("out", help="folder to write")
    p.add_argument("--format", default="vllm", choices=["vllm"], help="target runtime [default: %(default)s]")
    p.add_argument("--arch", default="token_classify", choices=["token_classify", "seq_cls", "prm", "reward"],
                   help="vLLM layout (model_store/vllm_export.py) [default: %(default)s]")
    p.add_argument("--store", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_model_export)
    p = model.add_parser("list", help="list the checkpoints of a store")
    p.add_argument("--store", default=None)
    p.set_defaults(func=cmd_model_list)

    for module_name in PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # that package, or an optional extra it needs, is not installed here
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, CheckpointError) as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
