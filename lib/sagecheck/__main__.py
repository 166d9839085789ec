"""Command line: ``python -m sagecheck run|report|compare|params|sync-notebooks``.

Exit codes: 0 all notebooks ran, 1 a notebook failed, 2 bad input (nothing ran), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from sagecheck.params import ParamError

# nbformat validates notebooks with jsonschema, which imports rfc3987_syntax where it is installed (JupyterLab's
# jupyter-events brings it) to check the "iri" string format; building that grammar takes over a second of every
# command's start, and the notebook schema has no such format. Marking the module absent makes jsonschema skip that one check.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[assignment]


def _split_only(values: list[str] | None) -> list[str] | None:
    """``--only 02,03 --only 05`` -> [02, 03, 05]; None where ``--only`` was not given (an empty list is refused later)."""
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def cmd_run(args: argparse.Namespace) -> int:
    from sagecheck.params import EMBEDDED_DEFAULT
    from sagecheck.run import run

    outcome = run(
        args.params or str(EMBEDDED_DEFAULT),
        overrides=args.p or (),
        only=_split_only(args.only),
        out=args.out,
        resume=args.resume,
        notebooks_dir=args.notebooks,
        kernel=args.kernel,
        report=not args.no_report,
        progress=not args.quiet,
    )
    for nb in outcome.failed:
        print(f"FAILED {nb.name}: {nb.error}", file=sys.stderr)
    if outcome.report_error:
        print(f"sagecheck: the notebooks ran but the HTML report could not be assembled: {outcome.report_error} "
              f"(results and executed notebooks are in {outcome.run_dir}; `python -m sagecheck report "
              f"{outcome.run_dir}` builds it again)", file=sys.stderr)
    if outcome.report:
        print(outcome.report)
    else:
        print(outcome.run_dir)
    return outcome.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from sagecheck.report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ParamError(f"run folder not found: {run_dir}")
    try:
        print(build_report(run_dir))
    except FileNotFoundError as e:
        raise ParamError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        from sagecheck.run import error_line

        print(f"sagecheck: the HTML report of {run_dir} could not be assembled: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sagecheck.report.compare_html import build

    page = build(args.run_dirs, args.out)
    print(page)
    print(page.with_name("compare.md"))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    import yaml

    from sagecheck import sources
    from sagecheck.params import EMBEDDED_DEFAULT

    params = sources.load(args.params or str(EMBEDDED_DEFAULT), args.p or ())
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from sagecheck.notebooks import sync_parameter_cells

    changed = sync_parameter_cells(Path(args.notebooks) if args.notebooks else None, check=args.check)
    for path in changed:
        print(("out of date: " if args.check else "updated: ") + str(path))
    return 1 if (args.check and changed) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sagecheck", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="execute the notebooks with a parameter file, then build the report")
    r.add_argument("--params", help="YAML parameter file (default: the embedded default, params/default.yaml: the built-in "
                                    "model, no GPU, no download)")
    r.add_argument("-p", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. -p logits.n_short=4")
    r.add_argument("--only", action="append", metavar="NAMES", help="notebooks to run (comma separated; 02, logits or 02_logits)")
    r.add_argument("--out", help="run folder (default: outputs/<params-name>-<hash>)")
    r.add_argument("--resume", action="store_true", help="skip notebooks whose results exist for the same parameters")
    r.add_argument("--notebooks", help="folder of notebooks (default: the project's notebooks/)")
    r.add_argument("--kernel", help="Jupyter kernel name (default: 'sagecheck', installed for this interpreter)")
    r.add_argument("--no-report", action="store_true", help="do not build report.html at the end")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="build report.html and summary.md from a run folder")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    co = sub.add_parser("compare", help="put run folders side by side (other GPUs, tensor-parallel sizes, parameters): "
                                        "compare.html, compare.md, compare.json")
    co.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run folders")
    co.add_argument("--out", required=True, help="folder for the comparison's files")
    co.set_defaults(func=cmd_compare)

    pa = sub.add_parser("params", help="validate parameters and print them with all defaults")
    pa.add_argument("--params", help="YAML parameter file (default: the embedded default)")
    pa.add_argument("-p", action="append", metavar="KEY=VALUE")
    pa.set_defaults(func=cmd_params)

    sy = sub.add_parser("sync-notebooks", help="rewrite each notebook's parameters cell from the schema")
    sy.add_argument("--notebooks")
    sy.add_argument("--check", action="store_true", help="only report notebooks that are out of date (exit 1)")
    sy.set_defaults(func=cmd_sync)
    return parser


class _QuietInterrupt:
    """Ctrl-C ends the command with one line. On the first SIGINT, stderr (file descriptor 2) goes to /dev/null before
    KeyboardInterrupt is raised, so that what the unwinding prints (the kernel client's threads, papermill's cleanup) stays
    out of the terminal; :meth:`say` writes the one line to the real stderr."""

    def __init__(self) -> None:
        self.saved_fd: int | None = None

    def __enter__(self) -> "_QuietInterrupt":
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is signal.default_int_handler and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        """The handler put back; after an interruption stderr stays quiet: what is still printed while the process ends
        (an asyncio task's "exception was never retrieved" when it is collected) is noise after the one line."""
        if signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum: int, frame: object) -> None:
        if self.saved_fd is None:
            sys.stderr.flush()
            self.saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        raise KeyboardInterrupt

    def say(self, line: str) -> None:
        """The one line, on the real stderr (file descriptor 2 itself stays on /dev/null after an interruption)."""
        if self.saved_fd is None:
            print(line, file=sys.stderr, flush=True)
        else:
            os.write(self.saved_fd, (line + "\n").encode())


def _resume_command(argv: list[str]) -> str:
    """The command that goes on from an interrupted run, as it can be pasted: this interpreter (a ``python`` on the PATH
    may not be the one sagecheck is installed in, e.g. after ``make report``), the same arguments, ``--resume``."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join([sys.executable, "-m", "sagecheck", *args, "--resume"])


def main(argv: list[str] | None = None) -> int:
    from sagecheck.run import RunInterrupted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    with _QuietInterrupt() as quiet:
        try:
            return args.func(args)
        except ParamError as e:
            print(f"sagecheck: error: {e}", file=sys.stderr)
            return 2
        except RunInterrupted as e:
            kept = f"{len(e.kept)} finished notebook(s) kept ({', '.join(e.kept)})" if e.kept else "no notebook had finished"
            quiet.say(f"sagecheck: interrupted (Ctrl-C); {kept} in {e.run_dir}; `{_resume_command(argv)}` goes on from there")
            return 130
        except KeyboardInterrupt:
            quiet.say("sagecheck: interrupted (Ctrl-C)")
            return 130


if __name__ == "__main__":
    sys.exit(main())
