"""Example apps for the seed's scenarios (run them with `anyserve run` or `make demo`)."""
