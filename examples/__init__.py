"""Example apps for the README's five scenarios (run them with `anyserve run` or `make demo`)."""
