"""The distributed runtime: a coordinator and volunteer nodes talking through an MQTT broker.

`protocol` holds the versioned envelopes and the topic layout, `mqtt` the client helpers
(broker URLs, TLS, TCP_NODELAY), `preflight` the step-by-step connection checks,
`coordinator` the `Executor` the round engine drives, `volunteer` the node process and
`broker` the Mosquitto configuration. `cli` adds the `node` and `broker` subcommands.
Nothing here is imported unless a distributed run is asked for.
"""
