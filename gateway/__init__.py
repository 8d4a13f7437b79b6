"""The multicluster gateway: terminates mTLS from linked clusters, authorizes the caller,
and re-originates mTLS to the target workload's proxy."""
