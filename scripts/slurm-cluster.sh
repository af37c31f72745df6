#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests and for trying the Slurm launcher:
# munged, MariaDB, slurmdbd (accounting: submitit reads job states with sacct), slurmctld and
# slurmd, all bound to 127.0.0.1, all state under one folder, no systemd needed.
#
#   scripts/slurm-cluster.sh up       install the Debian packages if missing (root), start the
#                                     daemons (reused when already up), print `export SLURM_CONF=...`
#   scripts/slurm-cluster.sh status   exit 0 when every daemon is up and the node takes jobs
#   scripts/slurm-cluster.sh down     stop the daemons this script started (by their pid files)
#   scripts/slurm-cluster.sh clean    down, then delete the state folder (job ids restart at 1)
#
# Use it with:  eval "$(scripts/slurm-cluster.sh up)"; sinfo; ...; scripts/slurm-cluster.sh down
#
# Environment: XTC_SLURM_DIR (state folder, default /tmp/xtc-slurm), XTC_SLURM_CPUS (CPUs the
# node advertises, default 4: more than the machine has, so a 2-task job and a 1-task job fit
# at once), XTC_SLURM_DB_PORT (MariaDB's port on 127.0.0.1, default 13306). Slurm itself uses
# ports 6817 (slurmctld), 6818 (slurmd) and 6819 (slurmdbd) on 127.0.0.1.
set -euo pipefail

DIR=${XTC_SLURM_DIR:-/tmp/xtc-slurm}
CPUS=${XTC_SLURM_CPUS:-4}
DB_PORT=${XTC_SLURM_DB_PORT:-13306}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CONF=$DIR/etc/slurm.conf
DB_SOCKET=$DIR/mysql-run/mysqld.sock
# Start order; `down` stops them in reverse.
DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)
export SLURM_CONF=$CONF

say() { echo "slurm-cluster: $*" >&2; }
die() {
	echo "error: $*" >&2
	exit 2
}
pidfile() { echo "$DIR/run/$1.pid"; }
running() { [[ -f $(pidfile "$1") ]] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "$what did not come up within the time limit; logs: $DIR/log/"
		sleep 0.2
	done
}

install_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	((EUID == 0)) || die "Debian packages missing (${missing[*]}); installing them needs root"
	say "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# The packages' own services must not start (this script starts the daemons its way): deny
	# them for the install, as container images do, unless a policy is already in place.
	local policy=/usr/sbin/policy-rc.d own_policy=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		own_policy=1
	fi
	local ok=1
	{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null || ok=0
	((own_policy)) && rm -f "$policy"
	((ok)) || die "apt-get install ${missing[*]} failed"
}

write_configs() {
	mkdir -p "$DIR"/{etc,run,log,state/ctld,state/d,munge,mysql,mysql-run}
	chmod 755 "$DIR"
	cat >"$CONF" <<EOF
# Written by scripts/slurm-cluster.sh: one node called localhost at 127.0.0.1.
ClusterName=xtc
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (read at slurmctld start only) also delays a requeued job's restart: 10 s, not 120 s.
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups here: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
# CPUs are the consumable resource, memory is not (else one job takes the whole node).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1,batch_sched_delay=0
KillWait=5
ReturnToService=2
InactiveLimit=0
MinJobAge=600
# The node advertises CPUS=$CPUS whatever the machine has.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
	cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by scripts/slurm-cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
	chmod 600 "$DIR/etc/slurmdbd.conf"
}

# munged on its default socket (every Slurm program looks there); one that already answers is
# used as it is (and not stopped by `down`).
start_munged() {
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
		say "using the munged already running"
		return
	fi
	if [[ ! -f /etc/munge/munge.key ]]; then
		mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge/munge.key
	fi
	mkdir -p /run/munge
	chown munge:munge /run/munge "$DIR/munge"
	chmod 755 /run/munge
	chmod 700 "$DIR/munge"
	touch "$(pidfile munged)" "$DIR/log/munged.log"
	chown munge:munge "$(pidfile munged)" "$DIR/log/munged.log"
	runuser -u munge -- munged --force --pid-file="$(pidfile munged)" --log-file="$DIR/log/munged.log" \
		--seed-file="$DIR/munge/munged.seed"
	wait_for 10 munged bash -c "munge -n | unmunge"
}

start_mariadb() {
	chown mysql:mysql "$DIR/mysql" "$DIR/mysql-run"
	local first=0
	if [[ ! -d $DIR/mysql/mysql ]]; then
		first=1
		mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --skip-test-db \
			--auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 ||
			die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
	fi
	touch "$DIR/log/mariadb.log"
	chown mysql:mysql "$DIR/log/mariadb.log"
	setsid mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
		--bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --skip-log-bin \
		--innodb-buffer-pool-size=64M --pid-file="$DIR/mysql-run/mariadb.pid" \
		--log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
	echo $! >"$(pidfile mariadb)"
	wait_for 30 MariaDB mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "SELECT 1"
	if ((first)); then
		mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "
			CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
			GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
	fi
}

start_slurm() {
	slurmdbd
	wait_for 60 slurmdbd sacctmgr -n list cluster
	if ! sacctmgr -n -P list cluster format=cluster | grep -qx xtc; then
		sacctmgr -i add cluster xtc >/dev/null
	fi
	slurmctld
	wait_for 30 slurmctld scontrol ping
	slurmd -N localhost
	wait_for 30 "the node" node_idle
}

node_idle() { [[ $(sinfo -h -n localhost -o %T 2>/dev/null) =~ ^(idle|mixed|allocated) ]]; }

all_running() {
	local d
	munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || return 1
	for d in "${DAEMONS[@]:1}"; do running "$d" || return 1; done
}

up() {
	if all_running && node_idle; then
		say "already up ($DIR)"
	else
		((EUID == 0)) || die "starting the local Slurm cluster needs root"
		local t0=$SECONDS
		install_packages
		down quiet # whatever is left of a previous, partial start
		write_configs
		start_munged
		start_mariadb
		start_slurm
		say "up in $((SECONDS - t0)) s: node localhost with $CPUS CPUs, partition debug, logs in $DIR/log/"
	fi
	echo "export SLURM_CONF=$CONF"
}

down() {
	local i d pid
	for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
		d=${DAEMONS[i]}
		running "$d" || continue
		pid=$(cat "$(pidfile "$d")")
		kill "$pid"
		for _ in $(seq 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
		[[ ${1:-} == quiet ]] || say "stopped $d ($pid)"
	done
	rm -f "$DIR"/run/*.pid
}

case ${1:-} in
up) up ;;
down) down ;;
status) all_running && node_idle ;;
clean)
	down
	rm -rf "$DIR"
	;;
*) die "usage: $0 up|down|status|clean" ;;
esac
