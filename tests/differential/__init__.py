"""Differential tests: each scenario runs on the simulated /dev/kvm and on the host's."""
