"""matplotlib for the bench scripts: a bench-only dependency, installed from PyPI when missing."""
import subprocess, sys


def pyplot(who):
    """matplotlib.pyplot on the Agg backend, or None (with a message naming `who`) if it cannot be had."""
    for attempt in range(2):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            return plt
        except Exception:
            if attempt == 0:
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"])
    print(f"{who}: matplotlib is not available; no plot written", file=sys.stderr)
    return None
