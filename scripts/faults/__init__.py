"""The fault battery's harness and cases; run it with `python scripts/fault_battery.py`."""
