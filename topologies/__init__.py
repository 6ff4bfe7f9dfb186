"""Communication topologies of a collective (networkx only): see `topologies.builders`."""

from topologies.builders import (
    KNOWN_TOPOLOGIES,
    TopologyError,
    build_topology,
    describe_topologies,
    topology_params_schema,
)
from topologies.files import read_topology_file

__all__ = [
    "KNOWN_TOPOLOGIES",
    "TopologyError",
    "build_topology",
    "describe_topologies",
    "read_topology_file",
    "topology_params_schema",
]
