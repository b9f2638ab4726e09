"""``make bench``: benchmarks of the inbound path, each measured against a baseline in the same run.

Run it with ``make bench`` (``python -m bench``); see ``__main__`` for what it measures and RESULTS.md for
the last numbers. Nothing here is imported by the service, nothing here asserts on timings, and nothing
here talks to anything but 127.0.0.1 or leaves a process running.
"""
