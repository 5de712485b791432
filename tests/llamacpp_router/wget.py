"""Stand-in for the `wget` package that llama.cpp's test harness imports at the top of utils.py.

Only its multimodal tests call it (to fetch images); the router tests never do, and nothing can
be downloaded in this suite anyway, so any call fails loudly."""


def download(url: str, *args: object, **kwargs: object) -> str:
    raise RuntimeError(f"no network in swapper's run of llama.cpp's router tests (wget.download {url})")
