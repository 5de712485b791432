"""swapper pull: placeholder until implemented."""

def pull_main(ns):
    raise SystemExit("swapper pull: not implemented yet")
