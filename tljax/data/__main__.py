"""`python -m tljax.data`: the registered data sources, their split sizes and whether they are installed here."""

from tljax.data.sources import format_sources, list_sources

if __name__ == "__main__":
    rows = list_sources()
    print(format_sources(rows))
    for r in rows:
        if not r["installed"]:
            print(f"{r['name']}: not installed; {r['provider']}")
