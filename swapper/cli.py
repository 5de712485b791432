"""The `swapper` command line.

    swapper serve --models-dir DIR [settings flags]   run the router
    swapper models [--json]                           list discovered models with estimates
    swapper gpu [--json]                              what the memory probes see
    swapper pull REPO[:QUANT|FILE]                    fetch a model from the Hugging Face Hub
    swapper install-engine llamacpp [--cuda|--hip]    build llama-server into the cache
    swapper systemd-unit [serve flags]                print a systemd unit for this box
    swapper config [settings flags]                   print the effective settings as YAML

Every settings flag is also a config key and a SWAPPER_* variable; a bad value anywhere exits
with status 2 and a one-line message naming its source and key.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .config import ConfigError, Settings
from .settings_load import add_setting_flags, list_presets, load_settings
from .units import format_bytes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapper",
        description="One OpenAI-compatible endpoint over many local models, swapped in and out of a "
                    "memory budget measured on the device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'swapper COMMAND --help' for a command's flags. Presets: " + ", ".join(list_presets()))
    p.add_argument("--version", action="version", version=f"swapper {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the router", allow_abbrev=False,
                       description="Run the router: one OpenAI-compatible endpoint; models start on demand in "
                       "child servers and are evicted to fit the budget. llama.cpp router command lines work "
                       "as they are: --models-max N, --no-models-autoload, and every other llama-server flag "
                       "(-c, -np, --jinja, ...) is passed to each llama.cpp child (see README).")
    add_setting_flags(s)

    m = sub.add_parser("models", help="list discovered models with size, estimate and learned footprint")
    add_setting_flags(m)
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument("--no-estimate", action="store_true", help="skip reading GGUF headers")

    g = sub.add_parser("gpu", help="show the devices the memory probes detect")
    g.add_argument("--json", action="store_true")
    g.add_argument("--device", default="auto", help="the device swapper would use (auto, cpu, nvidia:N, amd:N)")

    pl = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the models directory")
    pl.add_argument("spec", metavar="REPO[:QUANT|FILE]", help="e.g. ggml-org/gemma-3-270m-it-GGUF:Q8_0")
    pl.add_argument("--models-dir", default=None, help="destination (default: settings' models_dir, else ./models)")
    pl.add_argument("--config", default=None)
    pl.add_argument("--preset", default=None)
    pl.add_argument("--revision", default=None)
    pl.add_argument("--offline", action="store_true", help="never touch the network; fail saying what to do")
    pl.add_argument("--snapshot", action="store_true", help="download the whole repo (vLLM models)")

    ie = sub.add_parser("install-engine", help="build llama-server into the cache (state dir)")
    ie.add_argument("engine", choices=["llamacpp"])
    v = ie.add_mutually_exclusive_group()
    v.add_argument("--cuda", action="store_true", help="NVIDIA build (-DGGML_CUDA=ON)")
    v.add_argument("--hip", action="store_true", help="AMD build (-DGGML_HIP=ON)")
    ie.add_argument("--state-dir", default=None)
    ie.add_argument("--jobs", type=int, default=None)
    ie.add_argument("--force", action="store_true", help="rebuild even if cached")
    ie.add_argument("--print-path", action="store_true", help="only print where the binary is (or would be)")

    su = sub.add_parser("systemd-unit", allow_abbrev=False, help="print a systemd unit running 'swapper serve' with these flags")
    add_setting_flags(su)
    su.add_argument("--user", default=None, help="User= for the unit (default: a dynamic user)")
    su.add_argument("--exec", default=None, help="path of the swapper executable (default: this one)")

    c = sub.add_parser("config", allow_abbrev=False, help="print the effective settings (defaults < preset < file < env < flags)")
    add_setting_flags(c)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if extra and ns.command not in ("serve", "config", "systemd-unit"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if ns.command in ("serve", "config", "systemd-unit"):
            from .router_cli import parse_router_args

            ns.router = parse_router_args(extra)  # llama.cpp router flags (applied by load_settings)
        return _run(ns)
    except ConfigError as e:
        print(f"swapper: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "serve":
        from .app import serve, settings_loader

        # like llama.cpp's router, serving only the Hugging Face cache (or nothing yet) is fine
        st = load_settings(ns)
        if st.models_path is not None and not st.models_path.is_dir():
            print(f"swapper: --models-dir {st.models_dir}: not a directory", file=sys.stderr)
            return 2
        return serve(st, settings_loader(ns))
    if ns.command == "models":
        return _models(ns)
    if ns.command == "gpu":
        return _gpu(ns)
    if ns.command == "pull":
        from .pull import pull_main

        return pull_main(ns)
    if ns.command == "install-engine":
        return _install_engine(ns)
    if ns.command == "systemd-unit":
        from .systemd_unit import render_unit

        st = load_settings(ns)
        print(render_unit(st, ns, sys.argv), end="")
        return 0
    if ns.command == "config":
        from .settings_load import render_yaml

        print(render_yaml(load_settings(ns)), end="")
        return 0
    raise AssertionError(ns.command)


def _models(ns: argparse.Namespace) -> int:
    from .app import discover
    from .estimate import Estimator, FootprintStore

    st = load_settings(ns)
    catalog = discover(st)
    kind = "host"
    if not ns.no_estimate:
        from .device_set import detect_all

        try:
            kind = detect_all(st.device)[0].kind
        except Exception:
            kind = "host"
    est = Estimator(FootprintStore(st.state_path / "footprints.json"), kind)
    rows: list[dict[str, Any]] = []
    for e in catalog:
        row: dict[str, Any] = {"id": e.id, "engine": e.engine, "source": e.source,
                               "path": str(e.path) if e.path else e.repo, "size_bytes": e.size,
                               "aliases": list(e.aliases), "mmproj": str(e.mmproj) if e.mmproj else None,
                               "pinned": e.pinned, "adapters": [a.name for a in e.adapters]}
        if not ns.no_estimate:
            x = est.estimate(e)
            row.update(estimate_bytes=x.bytes, learned_bytes=x.learned, estimate_source=x.source,
                       weights_bytes=x.weights, kv_bytes=x.kv, overhead_bytes=x.overhead)
        rows.append(row)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models found" + (f" in {st.models_dir}" if st.models_dir else ""))
        return 0
    headers = ["NAME", "ENGINE", "SIZE", "ESTIMATE", "LEARNED", "SOURCE", "FILE"]
    table = [[r["id"], r["engine"], format_bytes(r["size_bytes"]),
              format_bytes(r["estimate_bytes"]) if "estimate_bytes" in r else "-",
              format_bytes(r["learned_bytes"]) if r.get("learned_bytes") else "-",
              r["source"], r["path"] or ""] for r in rows]
    _print_table(headers, table)
    return 0


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for line in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def _gpu(ns: argparse.Namespace) -> int:
    from .device_set import detect_all
    from .gpu import all_probes, probe_id

    planned_probes: list = []
    try:
        planned_probes = detect_all(ns.device)
        selected = ", ".join(probe_id(p) for p in planned_probes)
    except Exception as e:
        selected = f"error: {e}"
    planned = [probe_id(p) for p in planned_probes]
    probes = all_probes()
    known = {probe_id(p) for p in probes}
    probes += [p for p in planned_probes if probe_id(p) not in known]  # MIG instances, by their own id
    out = []
    for p in probes:
        row = {"id": probe_id(p), "kind": p.kind, "index": p.index, "name": p.name, "planned": probe_id(p) in planned}
        try:
            mem = p.memory()
            procs = [{"pid": x.pid, "bytes": x.bytes} for x in p.processes()]
            out.append({**row, "total": mem.total, "used": mem.used, "free": mem.free, "offload": p.offload,
                        "processes": procs})
        except Exception as e:
            out.append({**row, "error": str(e)})
    if ns.json:
        print(json.dumps({"selected": selected, "planned": planned, "devices": out}, indent=2))
        return 0
    print(f"devices planned by 'swapper serve --device {ns.device}' (marked *): {selected}")
    rows = [[d["id"] + (" *" if d["planned"] else ""), d["name"], format_bytes(d.get("total", 0)), format_bytes(d.get("used", 0)),
             format_bytes(d.get("free", 0)), str(len(d.get("processes", []))) if "error" not in d else d["error"]]
            for d in out]
    _print_table(["DEVICE", "NAME", "TOTAL", "USED", "FREE", "PROCESSES"], rows)
    for d in out:
        for proc in d.get("processes", []):
            b = format_bytes(proc["bytes"]) if proc["bytes"] is not None else "?"
            print(f"  {d['id']} pid {proc['pid']}: {b}")
    return 0


def _install_engine(ns: argparse.Namespace) -> int:
    import subprocess

    from .engines import EngineNotFound, engine_dir, install_llamacpp

    st: Settings = load_settings(None, config_file=None) if ns.state_dir is None else Settings(state_dir=ns.state_dir)
    variant = "cuda" if ns.cuda else "hip" if ns.hip else "cpu"
    if ns.print_path:
        print(engine_dir(st.state_path, variant) / "bin" / "llama-server")
        return 0
    try:
        path = install_llamacpp(st.state_path, variant, jobs=ns.jobs, force=ns.force)
    except EngineNotFound as e:
        print(f"swapper: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"swapper: building llama-server failed (exit {e.returncode}); see the output above", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
