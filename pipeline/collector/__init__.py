"""The collector: every configured `opencode serve` daemon's `/global/event` -> Kafka.

One task per host, each on its own connection, so a host that refuses connections, stalls or
sends garbage costs only its own task. Per host:

- Stream: `GET /global/event`, each frame normalised (pipeline.model.envelope) and produced to
  `opencode.events` keyed `host:session_id`; frames that are not events go to `collector.dead`.
  No frame at all (not even a heartbeat) for `dead_after_heartbeats x heartbeat_period_s` while
  waiting for the daemon means the connection is dead: reconnect, with exponential backoff and
  full jitter. Time spent waiting on a sink that applies back-pressure does not count.
- Turn ends: `session.idle` or `session.status: idle` -> fetch `GET /session/{id}/message`
  (again, with backoff, until the last assistant message has `time.completed` or `error`,
  bounded) and `GET /session/{id}`, and produce a synthetic `pipeline.turn_ended`. Triggers for
  a session already being fetched are coalesced into one re-fetch after it.
- Reconcile: on every (re)connect, sessions updated since the last seen time that are idle now
  and whose content differs from what this collector last reported get a turn_ended with
  `backfill=True, source="reconcile"`. What was reported is kept per host in a state file,
  written only after the sink has flushed what it records, so a restart re-emits rather than
  loses (ingest dedupes by snapshot id).
- Poll fallback: some opencode releases send only heartbeats on the event stream. While no
  session frame has arrived for `poll_interval_s`, the same reconcile pass runs on a timer
  (`source="poll"`), which also notices sessions that were busy and are now idle.

`GET /session/status` is per instance directory in opencode 1.18.33 (without `?directory=` it
only shows the daemon's own working directory), while `GET /session`, `GET /session/{id}` and
its messages answer for every directory; so status is asked per directory of the sessions in
question, with one client per directory.

The sink is anything with `send(topic, key, value)` and `flush()`; `KafkaEventSink` is the
aiokafka one, with a bounded buffer that turns a broker outage into back-pressure on the host
tasks instead of memory growth.

Every wait for a duration (backoff, settling, polls, checkpoints, the silence limit) and every
timestamp goes through an injected `pipeline.clock.Clock`, so the unit tests run the collector
on `devkit.clock.FakeClock` and move time instead of sleeping.

The modules, in the order a record flows:

- `settings`: `CollectorSettings`, the validated `[collector]` section.
- `host`: `HostRunner`, everything done for one host (stream, turn ends, reconcile, poll).
- `turns`: pure rules on message listings: when a turn ended and whether it was reported.
- `state`: `HostStats` (counters) and `HostState` (what was reported, the state file).
- `sink`: the `EventSink` protocol and `KafkaEventSink`.
- `collector`: `Collector`, which runs the hosts' tasks and checkpoints their state.

Import from the modules; this package re-exports nothing.
"""
