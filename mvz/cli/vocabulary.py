"""One vocabulary across commands, and the old spellings kept for one release.

Every command spells the same thing the same way (``--model``, ``--resolution``, ``--batch-size``,
``--engines``, ``--rewards``, ``--reward-preset``, ``--device`` default auto) and the short flags
mean one thing everywhere: ``-h`` help, ``-q`` quiet, ``-v`` verbose, ``-m`` model, ``-o`` output, ``-c`` config,
``-p`` prompt, ``-s`` set. The old spellings below still work until the next release: they are rewritten
before parsing (so they stay out of ``--help``) and a note names the new one.
"""

from __future__ import annotations

# command -> old spelling -> new spelling
RENAMED: dict[str, dict[str, str]] = {
    "export": {"--batch": "--batch-size"},
    "bench": {"--batch": "--batch-size", "--engines-dir": "--engines"},
    "score": {"--reward": "--rewards", "-r": "--rewards", "--preset": "--reward-preset",
              "--rewards-preset": "--reward-preset", "-c": "--checkpoint"},
    "train": {"-p": "--preset"},
}
# global flags accepted before or after the command name
GLOBAL_FLAGS = {"-q": "--quiet", "--quiet": "--quiet", "-v": "--verbose", "--verbose": "--verbose"}


def normalize(argv: list[str]) -> tuple[list[str], list[str]]:
    """Rewrite old spellings to new ones and move global flags before the command.

    Returns (argv, notes). Everything after a literal ``--`` is left alone.
    """
    notes: list[str] = []
    flags: list[str] = []
    rest: list[str] = []
    command = None
    passthrough = False
    for k, arg in enumerate(argv):
        if passthrough or arg == "--":
            passthrough = True
            rest.append(arg)
            continue
        if command == "score" and arg == "-v" and k + 1 < len(argv) and argv[k + 1].isdigit():
            notes.append("-v now means --verbose; read as --views for this release (write --views).")
            rest.append("--views")
            continue
        if arg in GLOBAL_FLAGS:
            flags.append(GLOBAL_FLAGS[arg])
            continue
        if command is None and not arg.startswith("-"):
            command = arg
            rest.append(arg)
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        new = RENAMED.get(command or "", {}).get(name)
        if new:
            notes.append(f"{name} is now {new} (the old spelling goes away in the next release).")
            arg = new + eq + value
        rest.append(arg)
    return flags + rest, notes
