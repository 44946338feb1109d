# The issuance module of issuance.yaml: `input` and the result are documented in the README
# ("Issuance modules") and docs/issuance-input.schema.json.
package tessera.issuance

# The answer: allowed when nothing denies; TTL and scopes narrowed.
decision := {
	"allow": count(deny) == 0,
	"reasons": sort(deny),
	"ttl_seconds": ttl,
	"scopes": scopes,
}

# Highly sensitive endpoints only in working hours, 07:00 to 19:00 UTC.
deny contains "outside working hours (07:00-19:00 UTC) for a high-sensitivity endpoint" if {
	input.endpoint.labels.sensitivity == "high"
	not working_hours
}

# A workload that asks too often is stopped.
deny contains msg if {
	input.history.issued_last_minute >= 10
	msg := sprintf("%d credentials issued to this workload in the last minute (at most 10)", [input.history.issued_last_minute])
}

working_hours if {
	hour := floor((input.time.unix % 86400) / 3600)
	hour >= 7
	hour < 19
}

# High sensitivity: at most 5 minutes.
ttl := min([input.request.ttl_seconds, 300]) if {
	input.endpoint.labels.sensitivity == "high"
} else := input.request.ttl_seconds

# secrets:write only for deploy-* tasks.
scopes := [s | some s in input.request.scopes; scope_allowed(s)]

scope_allowed(s) if s != "secrets:write"

scope_allowed("secrets:write") if startswith(input.request.task, "deploy-")

# Unit tests: `tessera test policies/` runs every test_* rule.

request(task, hour_utc, issued) := {
	"workload": {"name": "research-agent", "spiffe_id": "spiffe://example.org/research-agent"},
	"endpoint": {"name": "research-vault", "kind": "secret-store", "labels": {"sensitivity": "high"}},
	"rule": {"name": "research-to-vault", "max_ttl_seconds": 1800, "bind": "process", "scopes": ["secrets:read", "secrets:write"]},
	"request": {"audience": "research-vault", "task": task, "ttl_seconds": 1800, "scopes": ["secrets:read", "secrets:write"]},
	# 2026-12-04 00:00:00 UTC plus the hour.
	"time": {"unix": 1796342400 + (hour_utc * 3600)},
	"history": {"active": [], "issued_last_minute": issued},
}

test_allowed_in_working_hours_with_a_short_ttl if {
	d := decision with input as request("report-1", 10, 0)
	d.allow
	d.ttl_seconds == 300
}

test_write_scope_only_for_deploy_tasks if {
	report := decision with input as request("report-1", 10, 0)
	report.scopes == ["secrets:read"]
	deploy := decision with input as request("deploy-7", 10, 0)
	deploy.scopes == ["secrets:read", "secrets:write"]
}

test_denied_at_night if {
	d := decision with input as request("report-1", 22, 0)
	not d.allow
	d.reasons == ["outside working hours (07:00-19:00 UTC) for a high-sensitivity endpoint"]
}

test_denied_when_asking_too_often if {
	d := decision with input as request("report-1", 10, 10)
	not d.allow
}
