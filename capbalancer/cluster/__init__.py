"""Several proxy replicas (or worker processes) with one view of the fleet, through a shared store."""
