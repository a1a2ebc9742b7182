"""Flower app for gradzip's end-to-end experiment: FedAvg of a batch-norm CNN on digits."""
