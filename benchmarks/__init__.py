"""trio-jobs benchmarks: each prints its figures and the ratio to a baseline run alongside."""
