# The kernel matrix's in-VM suite (busybox sh; run by /init). Every result is one line on the
# console: `KTEST PASS|FAIL <check> <detail>`, `KTEST VERIFIER <program> <insns|n/a>`,
# `KTEST TIME <phase> <seconds>`, and last `KTEST SUMMARY pass=N fail=M`.
# The policy is /etc/tessera/kernels.yaml (written by xtask/src/kernels.rs): workload `app`
# (cgroup /tessera-vm/app) reaches `vault` (tcp 8200) and `dns` (udp 8200) with a process-bound
# credential, `tree` (8201) with a process-tree one and `shared` (8202) with a workload one.

CG=/sys/fs/cgroup/tessera-vm
APP=$CG/app
API=/run/tessera/workload.sock
ADMIN=/run/tessera/admin.sock
LOG=/var/log/tessera/decisions.jsonl
AGENT_LOG=/tmp/agent.log
SPIFFE=spiffe://kernels.tessera.dev/app
# Verifier budget: 30 % of the kernel's 1,000,000 processed instructions. It was 25 %; the
# record of each connection made under a credential (issue 11) brought 6.1's connect6 to about
# 277,000. Getting 6.1 back under 25 % is open work (README, kernel matrix).
BUDGET=300000
LOAD_TIMEOUT=${KTEST_LOAD_TIMEOUT:-400}
PASS=0
FAIL=0
AGENT=

pass() { PASS=$((PASS + 1)); echo "KTEST PASS $1 $2"; }
fail() { FAIL=$((FAIL + 1)); echo "KTEST FAIL $1 $2"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN { printf \"%.1f\", $(now) - $1 }"; }
one_line() { tr '\n' ' ' | cut -c1-"${1:-400}"; }

# Runs CMD inside the workload's cgroup (the subshell moves itself, then execs).
inapp() { ( echo 0 > "$APP/cgroup.procs" && exec "$@" ); }

# The last decision record of process PID (waits up to 10 s for one).
record() {
  i=0
  while [ $i -lt 100 ]; do
    l=$(grep "\"tgid\":$1[,}]" "$LOG" 2>/dev/null | tail -n 1)
    if [ -n "$l" ]; then echo "$l"; return 0; fi
    usleep 100000
    i=$((i + 1))
  done
  return 1
}
field() { echo "$1" | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p"; }
pid_of() { echo "$1" | sed -n 's/^pid=\([0-9]*\).*/\1/p' | head -n 1; }
value_of() { echo "$1" | sed -n "s/.* $2=\([^ ]*\).*/\1/p" | head -n 1; }

# NAME PID WANT: the record of PID has verdict/reason WANT (e.g. allow/credential_valid).
expect_record() {
  rec=$(record "$2") || { fail "$1" "no decision record for pid $2"; return 1; }
  got="$(field "$rec" verdict)/$(field "$rec" reason)"
  hook=$(field "$rec" hook)
  case "$got" in
    $3) pass "$1" "$got hook=$hook"; return 0 ;;
  esac
  fail "$1" "record $got hook=$hook (want $3)"
  return 1
}

# Starts `tessera run` in the background: $AGENT is its pid; a watcher subshell writes its exit
# status to /tmp/agent.exit (busybox sh may reap a background job before `wait` asks).
start_agent() {
  rm -f "$API" "$ADMIN" /tmp/agent.pid /tmp/agent.exit
  (
    RUST_LOG=info tessera run --policy /etc/tessera/kernels.yaml --cgroup "$CG" \
      --api-socket "$API" --admin-socket "$ADMIN" --decision-log "$LOG" \
      --state-dir /var/lib/tessera --metrics-addr off ${CONNECTION_END:+--connection-end "$CONNECTION_END"} \
      >/dev/null 2>>"$AGENT_LOG" &
    echo $! > /tmp/agent.pid
    wait $!
    echo $? > /tmp/agent.exit
  ) &
  while ! [ -s /tmp/agent.pid ]; do usleep 10000; done
  AGENT=$(cat /tmp/agent.pid)
}

# Waits (up to 30 s) until the agent has exited and its status is written.
agent_gone() {
  i=0
  while ! [ -s /tmp/agent.exit ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
}

# Waits until the agent serves both sockets; returns 1 when it exits or times out.
wait_ready() {
  deadline=$(($(cut -d. -f1 /proc/uptime) + LOAD_TIMEOUT))
  while ! [ -S "$API" ] || ! [ -S "$ADMIN" ]; do
    kill -0 "$AGENT" 2>/dev/null || return 1
    [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || return 1
    usleep 200000
  done
  return 0
}

# Why the agent did not start, on one line: the verifier's complaint when there is one.
load_failure() {
  kill -0 "$AGENT" 2>/dev/null && { echo "not ready after ${LOAD_TIMEOUT}s"; return; }
  agent_gone
  code=$(cat /tmp/agent.exit 2>/dev/null)
  funcs=$(grep -o 'unknown func [A-Za-z_0-9#]*' "$AGENT_LOG" | sort -u | sed 's/^unknown func //' | tr '\n' ' ')
  last=$(grep -v '^[0-9]*: ' "$AGENT_LOG" | grep -i 'error' | tail -n 1 | one_line 300)
  echo "tessera run exited ${code:-?}; ${funcs:+verifier: unknown func ${funcs% }; }$last"
}

# Whether this kernel is older than the agent's floor (5.15).
below_floor() {
  rel=$(uname -r)
  maj=${rel%%.*}
  rest=${rel#*.}
  min=${rest%%.*}
  [ "$maj" -lt 5 ] || { [ "$maj" -eq 5 ] && [ "$min" -lt 15 ]; }
}

finish() {
  [ -n "$AGENT" ] && kill -0 "$AGENT" 2>/dev/null && { kill "$AGENT"; agent_gone; }
  echo "KTEST SUMMARY pass=$PASS fail=$FAIL"
  echo "KTEST AGENTLOG-BEGIN"
  grep -v '^[0-9]*: ' "$AGENT_LOG" | tail -n 40
  echo "KTEST AGENTLOG-END"
  exit 0
}

mkdir -p "$APP" /run/tessera
probe serve 8200 8201 8202 8299 >/dev/null &
usleep 300000

# --- load ---
t0=$(now)
start_agent
if ! wait_ready; then
  echo "KTEST TIME load $(since "$t0")"
  if below_floor; then
    # Below the supported floor the agent must refuse at once, say why, and change nothing.
    if grep -q "tessera run needs Linux 5.15 or later" "$AGENT_LOG" && [ ! -e /sys/fs/bpf/tessera ]; then
      pass refuses-below-floor "$(grep -o 'tessera run needs Linux.*this is [0-9.]*' "$AGENT_LOG" | head -n 1)"
    else
      fail load "$(load_failure)"
    fi
    echo "KTEST NOTE below the 5.15 floor: only the refusal is checked"
    finish
  fi
  fail load "$(load_failure)"
  echo "KTEST NOTE every other check needs a running agent: not run"
  finish
fi
echo "KTEST TIME load $(since "$t0")"
pass load "ready in $(since "$t0")s"
t_suite=$(now)

# --- verifier headroom ---
over=0
probe progs /sys/fs/bpf/tessera > /tmp/progs.txt
while read -r kind id type name insns; do
  [ "$kind" = prog ] || continue
  n=${insns#verified_insns=}
  name=${name#name=}
  echo "KTEST VERIFIER $name $n"
  if [ "$n" != n/a ] && [ "$n" -gt "$BUDGET" ]; then over=$((over + 1)); fi
done < /tmp/progs.txt
count=$(sed -n 's/^progs count=//p' /tmp/progs.txt)
if grep -q 'verified_insns=n/a' /tmp/progs.txt; then
  pass verifier-budget "n/a: this kernel does not report verified_insns ($count programs)"
elif [ "$over" -eq 0 ] && [ "${count:-0}" -gt 0 ]; then
  pass verifier-budget "$count programs, each <= $BUDGET"
else
  fail verifier-budget "$over of ${count:-0} programs over $BUDGET processed instructions"
fi

# --- how this kernel ends a connection whose credential ended (the self-test's
# revoke_open_connection and revoke_connected_udp exercise it) ---
mech=$(tessera status --json --admin-socket "$ADMIN" 2>/dev/null | tr -d ' \n' | sed -n 's/.*"connection_end":"\([a-z_]*\)".*/\1/p')
echo "KTEST NOTE connection_end=${mech:-missing}"
case "$mech" in
  sock_diag_destroy) pass connection-end "$mech (SOCK_DESTROY over sock_diag)" ;;
  *) fail connection-end "kernel.connection_end=${mech:-missing}" ;;
esac

# --- denies without a credential ---
deny() { # NAME OP FAMILY PORT HOOK (a pattern)
  out=$(inapp probe "$2" "$3" "$4")
  pid=$(pid_of "$out")
  res=$(value_of "$out" result)
  if [ "$res" != EPERM ]; then fail "$1" "result=$res (want EPERM)"; return; fi
  rec=$(record "$pid") || { fail "$1" "EPERM but no decision record for pid $pid"; return; }
  got="$(field "$rec" verdict)/$(field "$rec" reason)/$(field "$rec" hook)"
  case "$got" in
    deny/no_credential/$5) pass "$1" "EPERM $got" ;;
    *) fail "$1" "EPERM but record $got (want deny/no_credential/$5)" ;;
  esac
}
deny deny-connect4 connect 4 8200 connect4
deny deny-connect6 connect 6 8200 connect6
deny deny-connect-v4mapped connect mapped 8200 connect6
deny deny-sendmsg4 send 4 8200 sendmsg4
deny deny-sendmsg6 send 6 8200 sendmsg6
# A UDPv6 socket sending to a v4-mapped address goes through the IPv4 path (sendmsg4).
deny deny-sendmsg-v4mapped send mapped 8200 'sendmsg[46]'
out=$(inapp probe connect 4 8299)
res=$(value_of "$out" result)
if [ "$res" = ok ]; then pass unprotected-allowed "ok"; else fail unprotected-allowed "result=$res"; fi

# --- credentials, one per bind mode ---
out=$(inapp probe self "$API" vault 8200)
if [ "$(value_of "$out" status)" = 200 ] && [ "$(value_of "$out" connect)" = ok ]; then
  expect_record cred-process "$(pid_of "$out")" allow/credential_valid
else
  fail cred-process "$(echo "$out" | sed 's/^pid=[0-9]* //' | one_line)"
fi

out=$(inapp timeout 120 tessera exec --socket "$API" --audience tree -- probe connect 4 8201 2>&1)
if [ "$(value_of "$out" result)" = ok ]; then
  expect_record cred-process-tree "$(pid_of "$out")" allow/credential_valid
else
  fail cred-process-tree "$(echo "$out" | one_line)"
fi
out=$(inapp timeout 120 tessera exec --socket "$API" --audience tree -- sh -c 'probe connect 4 8201; true' 2>&1)
if [ "$(value_of "$out" result)" = ok ]; then
  expect_record cred-process-tree-child "$(pid_of "$out")" allow/credential_valid
else
  fail cred-process-tree-child "$(echo "$out" | one_line)"
fi

workload_token() { inapp timeout 120 tessera token --socket "$API" --audience shared >/dev/null 2>/tmp/token.err; }
if workload_token; then
  out=$(inapp probe connect 4 8202)
  if [ "$(value_of "$out" result)" = ok ]; then
    expect_record cred-workload "$(pid_of "$out")" allow/credential_valid
  else
    fail cred-workload "token issued, but another process of the workload: $(value_of "$out" result)"
  fi
else
  fail cred-workload "tessera token: $(one_line < /tmp/token.err)"
fi

# --- revocation ---
rm -f /tmp/go /tmp/hold.out
inapp probe self "$API" vault 8200 /tmp/go > /tmp/hold.out &
holder=$!
i=0
while ! grep -q 'status=' /tmp/hold.out 2>/dev/null && [ $i -lt 600 ]; do usleep 100000; i=$((i + 1)); done
jti=$(value_of "$(cat /tmp/hold.out)" jti)
if [ -n "$jti" ]; then
  revoked=$(tessera revoke --admin-socket "$ADMIN" --jti "$jti" 2>&1)
  touch /tmp/go
  wait "$holder"
  after=$(sed -n 's/.* after=//p' /tmp/hold.out)
  if [ "$after" = EPERM ]; then
    pass revoke-jti "ok before, EPERM after ($(echo "$revoked" | one_line 80))"
  else
    fail revoke-jti "after revoke: $after ($(echo "$revoked" | one_line 200))"
  fi
else
  touch /tmp/go
  wait "$holder"
  fail revoke-jti "no credential to revoke: $(sed 's/^pid=[0-9]* //' /tmp/hold.out | one_line)"
fi
if workload_token; then
  tessera revoke --admin-socket "$ADMIN" --workload "$SPIFFE" >/dev/null 2>&1
  out=$(inapp probe connect 4 8202)
  res=$(value_of "$out" result)
  if [ "$res" = EPERM ]; then
    expect_record revoke-workload "$(pid_of "$out")" "deny/*"
  else
    fail revoke-workload "after revoke --workload: $res"
  fi
else
  fail revoke-workload "no credential to revoke: $(one_line < /tmp/token.err)"
fi

# --- the decision log ---
lines=$(grep -c . "$LOG")
bad=$(grep -vc '"schema":"tessera.decision/v1"' "$LOG")
if grep -q 'eyJ' "$LOG"; then
  fail decision-log "a token is in the decision log"
elif [ "$bad" -ne 0 ]; then
  fail decision-log "$bad of $lines lines without schema tessera.decision/v1"
else
  pass decision-log "$lines records, all tessera.decision/v1, no token"
fi

# --- kill -9 and restart: the pins keep enforcing, the new agent adopts them ---
have_grant=0
workload_token && have_grant=1
kill -9 "$AGENT"
agent_gone
out=$(inapp probe connect 4 8200)
down_pid=$(pid_of "$out")
res=$(value_of "$out" result)
if [ "$res" = EPERM ]; then pass restart-down-enforces "EPERM while no agent runs"; else fail restart-down-enforces "result=$res while no agent runs"; fi
t0=$(now)
start_agent
if wait_ready; then
  echo "KTEST TIME reload $(since "$t0")"
  if grep -q 'adopted the pinned program set' "$AGENT_LOG"; then
    pass restart-adopts "adopted the pins in $(since "$t0")s"
  else
    fail restart-adopts "ready, but no 'adopted the pinned program set' in its log"
  fi
  expect_record restart-replays-decisions "$down_pid" deny/no_credential
  if [ "$have_grant" = 1 ]; then
    out=$(inapp probe connect 4 8202)
    res=$(value_of "$out" result)
    if [ "$res" = ok ]; then pass restart-keeps-grant "ok"; else fail restart-keeps-grant "result=$res"; fi
  else
    fail restart-keeps-grant "no credential before the kill: $(one_line < /tmp/token.err)"
  fi
else
  fail restart-adopts "$(load_failure)"
fi

# --- the packet-drop fallback (for kernels without SOCK_DESTROY), forced: the pinned set is
# replaced by one with the cgroup_skb programs; a connected UDP socket's sends are refused
# once its credential is revoked ---
if [ -n "$AGENT" ] && kill -0 "$AGENT" 2>/dev/null; then kill "$AGENT"; agent_gone; fi
CONNECTION_END=packet-drop start_agent
CONNECTION_END=
if wait_ready; then
  mech=$(tessera status --json --admin-socket "$ADMIN" 2>/dev/null | tr -d ' \n' | sed -n 's/.*"connection_end":"\([a-z_]*\)".*/\1/p')
  probe progs /sys/fs/bpf/tessera | grep 'tessera_connection' | while read -r kind id type name insns; do
    echo "KTEST VERIFIER ${name#name=} ${insns#verified_insns=}"
  done
  rm -f /tmp/go /tmp/hold.out
  inapp probe self "$API" dns 8200 /tmp/go udp > /tmp/hold.out &
  holder=$!
  i=0
  while ! grep -q 'status=' /tmp/hold.out 2>/dev/null && [ $i -lt 600 ]; do usleep 100000; i=$((i + 1)); done
  jti=$(value_of "$(cat /tmp/hold.out)" jti)
  first=$(value_of "$(cat /tmp/hold.out)" connect)
  [ -n "$jti" ] && tessera revoke --admin-socket "$ADMIN" --jti "$jti" >/dev/null 2>&1
  touch /tmp/go
  wait "$holder"
  after=$(sed -n 's/.* after=//p' /tmp/hold.out)
  if [ "$mech" = packet_drop ] && [ "$first" = ok ] && [ "$after" = EPERM ]; then
    pass connection-end-packet-drop "connected UDP: ok before, EPERM after the revocation"
  else
    fail connection-end-packet-drop "connection_end=${mech:-missing} before=${first:-?} after=${after:-?} ($(sed 's/^pid=[0-9]* //' /tmp/hold.out | one_line 200))"
  fi
else
  fail connection-end-packet-drop "$(load_failure)"
fi

# --- tessera selftest (its own agent and scratch cgroup) ---
if [ -n "$AGENT" ] && kill -0 "$AGENT" 2>/dev/null; then kill "$AGENT"; agent_gone; fi
AGENT=
tessera uninstall --cgroup "$CG" >/dev/null 2>&1
echo "KTEST TIME suite $(since "$t_suite")"
t0=$(now)
timeout 900 tessera selftest --keep-going --json /tmp/selftest.json >/tmp/selftest.out 2>&1
code=$?
echo "KTEST TIME selftest $(since "$t0")"
attempts=$(grep -cE '^  [a-z0-9_]+ +(pass|GAP|FAIL|skipped|not run)$' /tmp/selftest.out)
failed=$(grep -E '^  [a-z0-9_]+ +(FAIL|not run)$' /tmp/selftest.out | awk '{print $1}' | tr '\n' ' ')
gaps=$(grep -E '^  [a-z0-9_]+ +GAP$' /tmp/selftest.out | awk '{print $1}' | tr '\n' ' ')
if [ "$code" -eq 0 ]; then
  pass selftest "$attempts attempts, exit 0${gaps:+; documented gaps: ${gaps% }}"
else
  fail selftest "exit $code; $attempts attempts; ${failed:+failed: ${failed% }; }${gaps:+gaps: ${gaps% }; }$(tail -n 1 /tmp/selftest.out | one_line 200)"
  echo "KTEST SELFTEST-BEGIN"
  cat /tmp/selftest.out
  echo "KTEST SELFTEST-END"
fi
finish
