"""
Throwaway servers for tests, demos and benchmarks.

Each server here is real (the distribution's own binaries), private (its
own temporary folder, a free port on the loopback interface) and
disposable (L{stop} removes every trace).  Nothing is shared with, or
left behind on, the machine.

L{PostgresCluster} runs a PostgreSQL cluster with TLS from a throwaway CA
(L{testbed.pki.make_ca}) and C{pg_hba.conf} rules for the three password
methods a gateway has to cope with: SCRAM for everybody, except the role
C{md5_user} (md5) and the role C{trust_user} (trust)::

    with PostgresCluster() as cluster:
        cluster.create_role("app", "secret")
        psycopg2.connect(cluster.dsn("app", "secret"))

L{SshServer} runs OpenSSH's C{sshd} in the foreground with its own host
key and C{authorized_keys}, letting in only the keys given to
L{SshServer.authorize}, as the user running this process.

PostgreSQL refuses to run as root.  When this process is root, the cluster's
programs run as the unprivileged user C{nobody} and its folder is handed
over to that user.
"""

import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time

from testbed import pki


DEFAULT_POSTGRES_BIN_DIR = "/usr/lib/postgresql/15/bin"
UNPRIVILEGED_USER = "nobody"

MD5_USER = "md5_user"
TRUST_USER = "trust_user"

INCLUDED_CONF = "hoopgw.conf"

_LOG_TAIL_LINES = 40
_START_ATTEMPTS = 3


class ThrowawayError(Exception):
    """
    A throwaway server could not be set up, started, stopped or talked to.
    The message carries what the failing program said (and, for a server
    that would not start, the tail of its log).
    """


_PORTS_HANDED_OUT = set()


def _ephemeral_ports():
    """
    The range the kernel takes client connections' local ports from.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low, high = (int(word) for word in ranges.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def free_port(host="127.0.0.1"):
    """
    A TCP port on C{host} that nobody was listening on a moment ago and that
    this process has not handed out before.

    It is chosen below the kernel's range for client connections' local
    ports: a port the kernel chose (bind port 0, then close) could be taken
    by a client connection, or chosen again, before its listener binds it,
    and a busy machine showed both.

    @rtype: L{int}
    """
    low, _ = _ephemeral_ports()
    if low > 12000:
        first, last = 10000, low - 1
        start = first + secrets.randbelow(last - first + 1)
        for offset in range(last - first + 1):
            port = first + (start - first + offset) % (last - first + 1)
            if port not in _PORTS_HANDED_OUT and _bindable(host, port):
                _PORTS_HANDED_OUT.add(port)
                return port
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port
    raise OSError("no free TCP port on %s" % (host,))


def _bindable(host, port):
    """
    Whether a listener could bind C{host}:C{port} now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As a listener would: a connection of an earlier test still in
        # TIME_WAIT on the port does not stop it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _conf_literal(value):
    """
    Quote C{value} for C{postgresql.conf}.
    """
    return "'%s'" % (str(value).replace("\\", "\\\\").replace("'", "''"),)


def _conninfo_value(value):
    """
    Quote C{value} for a libpq keyword/value connection string.
    """
    return "'%s'" % (str(value).replace("\\", "\\\\").replace("'", "\\'"),)


def quote_identifier(name):
    """
    Quote C{name} as an SQL identifier.

    @rtype: L{str}
    """
    return '"%s"' % (name.replace('"', '""'),)


def quote_literal(value):
    """
    Quote C{value} as an SQL string literal (assuming
    C{standard_conforming_strings}, the default since PostgreSQL 9.1).

    @rtype: L{str}
    """
    if "\x00" in value:
        raise ValueError("SQL literals cannot contain NUL")
    return "'%s'" % (value.replace("'", "''"),)


def _tail(path, lines=_LOG_TAIL_LINES):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "(could not read %s: %s)" % (path, e)


def _clean_environment():
    """
    This process's environment without the C{PG*} variables that would
    point the server's or the client's programs elsewhere.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("PG")
    }
    env["LC_ALL"] = "C"
    return env


class _Started:
    """
    A context manager that starts the server on entry and stops it on exit.
    """

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False


class PostgresCluster(_Started):
    """
    A private PostgreSQL cluster on 127.0.0.1, for as long as it is needed.

    Call L{start} (or use it as a context manager), then connect with
    L{dsn}, run SQL with L{psql}, add roles with L{create_role} and
    databases with L{create_database}; L{stop} shuts it down and, if the
    cluster made its own folder, removes it.

    @ivar directory: the cluster folder: the data directory (C{data/}), the
        Unix socket, the log and the TLS files.  C{None} until L{start}
        when none was given.
    @ivar tls: whether the server offers TLS.
    @ivar bin_dir: where C{initdb}, C{pg_ctl} and C{postgres} live.
    @ivar settings: further C{postgresql.conf} settings, applied after (and
        so overriding) the cluster's own, e.g. C{{"log_statement": "all"}}.
    @ivar host: the address the server listens on, C{"127.0.0.1"}.
    @ivar port: its TCP port: the one given, or one L{start} finds free.
    @ivar superuser_password: the password of the C{postgres} superuser,
        generated by L{start}.
    @ivar ca: the L{testbed.pki.CertificateAuthority} that signed the
        server's certificate (C{None} without TLS); tests may issue client
        certificates from it.
    @ivar ca_path: the CA certificate's PEM file (C{None} without TLS).
    @ivar log_path: the server's log file.
    """

    host = "127.0.0.1"

    def __init__(self, directory=None, tls=True,
                 bin_dir=DEFAULT_POSTGRES_BIN_DIR, settings=None, port=None):
        self.directory = directory
        self._fixed_port = port
        self.settings = dict(settings or {})
        self.tls = tls
        self.bin_dir = bin_dir
        self.port = None
        self.superuser_password = None
        self.ca = None
        self.ca_path = None
        self.log_path = None
        self._owns_directory = False
        self._running = False
        self._account = None
        self._tls_settings = {}

    def __repr__(self):
        return "<PostgresCluster %s:%s in %s%s>" % (
            self.host, self.port, self.directory,
            "" if self._running else " (stopped)",
        )

    @property
    def data_directory(self):
        """
        The cluster's data directory (C{PGDATA}), inside L{directory}.
        """
        return os.path.join(self.directory, "data")

    @property
    def running(self):
        """
        Whether L{start} succeeded and L{stop} has not been called since.
        """
        return self._running

    # Setting up

    def start(self):
        """
        Create, configure and start the cluster: C{initdb}, C{postgresql.conf},
        C{pg_hba.conf}, TLS files, C{pg_ctl -w start}.

        @raise ThrowawayError: when any step fails; the message includes the
            program's output and the tail of the server log.  Whatever was
            created is cleaned up first.
        """
        if self._running:
            raise ThrowawayError("%r is already running" % (self,))
        self._account = self._unprivileged_account()
        try:
            self._make_directory()
            self._initdb()
            if self.tls:
                self._write_tls_files()
            self._write_hba()
            self._start_server()
        except BaseException:
            self._cleanup()
            raise

    def _unprivileged_account(self):
        """
        C{(uid, gid)} to run the server programs as, or C{None} to run them
        as this process's user.
        """
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            raise ThrowawayError(
                "running as root, and PostgreSQL will not; but there is no "
                "user %r to run it as" % (UNPRIVILEGED_USER,)
            )
        return entry.pw_uid, entry.pw_gid

    def _make_directory(self):
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="hoopgw-pg-")
            self._owns_directory = True
        else:
            self.directory = os.path.abspath(self.directory)
            os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.data_directory):
            raise ThrowawayError(
                "%s already exists; a throwaway cluster wants a fresh folder"
                % (self.data_directory,)
            )
        self.log_path = os.path.join(self.directory, "postgresql.log")
        if self._account is not None:
            self._check_traversable(os.path.dirname(self.directory))
            self._give_away(self.directory, 0o700)

    def _give_away(self, path, mode):
        """
        Hand C{path} to the account the server runs as, with C{mode}.
        """
        if self._account is not None:
            os.chown(path, *self._account)
        os.chmod(path, mode)

    def _check_traversable(self, directory):
        """
        Make sure the server's account can reach the cluster folder: every
        folder above it must be searchable by that account.  They are not
        ours to change, so say which one is in the way rather than chmod it.
        """
        uid, gid = self._account
        while True:
            info = os.stat(directory)
            if info.st_uid == uid:
                allowed = info.st_mode & stat.S_IXUSR
            elif info.st_gid == gid:
                allowed = info.st_mode & stat.S_IXGRP
            else:
                allowed = info.st_mode & stat.S_IXOTH
            if not allowed:
                raise ThrowawayError(
                    "%s is not searchable by %r (mode %o), so PostgreSQL, "
                    "which runs as that user, cannot reach %s; choose "
                    "another directory or chmod o+x it" % (
                        directory, UNPRIVILEGED_USER,
                        stat.S_IMODE(info.st_mode), self.directory,
                    )
                )
            parent = os.path.dirname(directory)
            if parent == directory:
                return
            directory = parent

    def _run_server_program(self, program, *arguments):
        """
        Run one of the server's programs as the server's account, in the
        cluster folder, and return its completed process; raise
        L{ThrowawayError} with its output when it fails.
        """
        command = [os.path.join(self.bin_dir, program)] + list(arguments)
        options = {}
        if self._account is not None:
            # Dropping privileges in the child, between fork and exec, the
            # way a preexec_fn calling setgroups/setgid/setuid would, but
            # without running Python code in the forked child (unsafe when
            # the parent has threads, as Twisted's reactor may).
            uid, gid = self._account
            options.update(user=uid, group=gid, extra_groups=[])
        try:
            result = subprocess.run(
                command,
                cwd=self.directory,
                env=_clean_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                **options,
            )
        except OSError as e:
            raise ThrowawayError("could not run %s: %s" % (command[0], e))
        if result.returncode != 0:
            raise ThrowawayError(
                "%s exited with status %d\n%s%s" % (
                    " ".join(command), result.returncode,
                    result.stdout, result.stderr,
                )
            )
        return result

    def _initdb(self):
        self.superuser_password = secrets.token_urlsafe(24)
        password_file = os.path.join(self.directory, "superuser-password")
        with open(os.open(password_file,
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "w") as f:
            f.write(self.superuser_password + "\n")
        try:
            self._give_away(password_file, 0o600)
            self._run_server_program(
                "initdb",
                "--pgdata=" + self.data_directory,
                "--username=postgres",
                "--auth=scram-sha-256",
                "--pwfile=" + password_file,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        finally:
            os.unlink(password_file)

    def _write_tls_files(self):
        self.ca = pki.make_ca("hoopgw throwaway PostgreSQL CA")
        server = self.ca.issue(
            "localhost",
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            server=True,
        )
        cert_path, key_path = server.write(self.directory, "server")
        self._give_away(cert_path, 0o644)
        # The server refuses a key others can read, or one it does not own
        # (unless root owns it and it is group-readable only).
        self._give_away(key_path, 0o600)
        self.ca_path = os.path.join(self.directory, "ca.crt")
        with open(self.ca_path, "wb") as f:
            f.write(self.ca.certificate_pem())
        self._give_away(self.ca_path, 0o644)
        self._tls_settings = {
            "ssl": "on",
            "ssl_cert_file": cert_path,
            "ssl_key_file": key_path,
            "ssl_ca_file": self.ca_path,
        }

    def _write_configuration(self):
        settings = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": self.directory,
            "fsync": "off",
            "max_connections": 100,
            "password_encryption": "scram-sha-256",
            # "connection authenticated: ... method=md5" lines let a test
            # see which pg_hba method let a client in.
            "log_connections": "on",
            "ssl": "off",
        }
        if self.tls:
            settings.update(self._tls_settings)
        settings.update(self.settings)
        # Our settings live in their own file, included at the end of
        # postgresql.conf so that they win; it is rewritten whole on every
        # start attempt, so it never carries a stale port.
        path = os.path.join(self.data_directory, INCLUDED_CONF)
        with open(path, "w") as f:
            f.write("# Written by testbed.throwaway.PostgresCluster\n")
            for name, value in settings.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    f.write("%s = %d\n" % (name, value))
                else:
                    f.write("%s = %s\n" % (name, _conf_literal(value)))
        self._give_away(path, 0o600)
        main = os.path.join(self.data_directory, "postgresql.conf")
        include = "include = %s\n" % (_conf_literal(INCLUDED_CONF),)
        with open(main, "r+") as f:
            if include not in f.read():
                f.write("\n# Added by testbed.throwaway.PostgresCluster\n")
                f.write(include)

    def _write_hba(self):
        lines = [
            "# Written by testbed.throwaway.PostgresCluster; first match wins.",
            "# TYPE  DATABASE  USER  ADDRESS  METHOD",
            "local  all  %s  md5" % (MD5_USER,),
            "local  all  %s  trust" % (TRUST_USER,),
            "local  all  all  scram-sha-256",
            "host  all  %s  127.0.0.1/32  md5" % (MD5_USER,),
            "host  all  %s  127.0.0.1/32  trust" % (TRUST_USER,),
            "host  all  all  127.0.0.1/32  scram-sha-256",
        ]
        path = os.path.join(self.data_directory, "pg_hba.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._give_away(path, 0o600)

    def _start_server(self):
        for attempt in range(_START_ATTEMPTS):
            self.port = self._fixed_port or free_port(self.host)
            self._write_configuration()
            try:
                self._run_server_program(
                    "pg_ctl", "start",
                    "--pgdata=" + self.data_directory,
                    "--log=" + self.log_path,
                    "--wait", "--timeout=60",
                )
            except ThrowawayError as e:
                log = _tail(self.log_path)
                # Somebody else may have taken the port between our probe
                # and the server's bind; try another.
                if ("could not bind" in log and not self._fixed_port
                        and attempt + 1 < _START_ATTEMPTS):
                    continue
                raise ThrowawayError(
                    "%s\n--- last lines of %s ---\n%s"
                    % (e, self.log_path, log)
                )
            self._running = True
            return

    # Tearing down

    def stop(self):
        """
        Stop the server (C{pg_ctl -m fast stop}) and, if the cluster created
        its folder, remove it.  Safe to call more than once.

        @raise ThrowawayError: when C{pg_ctl} fails to stop the server; the
            folder is left in place then, for a post-mortem.
        """
        if self._running:
            self._run_server_program(
                "pg_ctl", "stop",
                "--pgdata=" + self.data_directory,
                "--mode=fast", "--wait", "--timeout=60",
            )
            self._running = False
        self._remove_directory()

    def _cleanup(self):
        """
        Undo a L{start} that failed part way; never raises.
        """
        if self.directory is not None and os.path.exists(
                os.path.join(self.data_directory, "postmaster.pid")):
            try:
                self._run_server_program(
                    "pg_ctl", "stop", "--pgdata=" + self.data_directory,
                    "--mode=immediate", "--wait",
                )
            except ThrowawayError:
                pass
        self._running = False
        self._remove_directory()

    def _remove_directory(self):
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False

    # Using

    def dsn(self, user="postgres", password=None, dbname="postgres", **kw):
        """
        A libpq keyword/value connection string for this cluster, over TCP.

        With TLS, it asks for C{sslmode=verify-full} against L{ca_path}
        (the server's certificate names both C{127.0.0.1} and
        C{localhost}); without, C{sslmode=disable}.

        @param user: the role to connect as.
        @param password: its password; for C{postgres} left out, the
            generated L{superuser_password}.  C{None} otherwise means no
            password (e.g. for L{TRUST_USER}).
        @param dbname: the database.
        @param kw: further keywords, which override the ones above (e.g.
            C{host="localhost"}, C{sslmode="require"}).
        @rtype: L{str}
        """
        if password is None and user == "postgres":
            password = self.superuser_password
        params = {"host": self.host, "port": self.port, "user": user,
                  "dbname": dbname}
        if password is not None:
            params["password"] = password
        if self.tls:
            params.update(sslmode="verify-full", sslrootcert=self.ca_path)
        else:
            params["sslmode"] = "disable"
        params.update(kw)
        return " ".join(
            "%s=%s" % (name, _conninfo_value(value))
            for name, value in params.items()
            if value is not None
        )

    def psql(self, sql, user="postgres", password=None, dbname="postgres"):
        """
        Run C{sql} with the real C{psql} (C{-X -A -t -q -v ON_ERROR_STOP=1},
        the script on its standard input) and return what it printed:
        unaligned rows, one per line, columns separated by C{|}.

        @param password: given to C{psql} as C{PGPASSWORD}; for C{postgres}
            left out, the generated L{superuser_password}.
        @raise ThrowawayError: when C{psql} fails, with its standard error.
        @rtype: L{str}
        """
        if password is None and user == "postgres":
            password = self.superuser_password
        env = _clean_environment()
        if password is not None:
            env["PGPASSWORD"] = password
        command = [
            self._psql_binary(),
            "-X", "-A", "-t", "-q", "-w",
            "-v", "ON_ERROR_STOP=1",
            "-d", self.dsn(user, password=None, dbname=dbname),
            "-f", "-",
        ]
        result = subprocess.run(
            command, input=sql, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        if result.returncode != 0:
            raise ThrowawayError(
                "psql as %r on %r failed with status %d: %s" % (
                    user, dbname, result.returncode, result.stderr.strip(),
                )
            )
        return result.stdout

    def _psql_binary(self):
        candidate = os.path.join(self.bin_dir, "psql")
        if os.path.exists(candidate):
            return candidate
        return shutil.which("psql") or "psql"

    def create_role(self, name, password, method="scram-sha-256",
                    superuser=False):
        """
        Create a login role.

        @param password: its password.
        @param method: how the password is stored: C{"scram-sha-256"},
            C{"md5"} (which pg_hba's C{md5} method needs: a SCRAM-stored
            password would be checked with SCRAM instead), or C{None} for
            no password at all (for L{TRUST_USER}).
        @param superuser: make it a superuser.
        """
        sql = "CREATE ROLE %s LOGIN%s" % (
            quote_identifier(name), " SUPERUSER" if superuser else "",
        )
        if method is None:
            prelude = ""
        elif method in ("scram-sha-256", "md5"):
            if password is None:
                raise ValueError("method %r needs a password" % (method,))
            prelude = "SET password_encryption = %s;\n" % (
                quote_literal(method),)
            sql += " PASSWORD %s" % (quote_literal(password),)
        else:
            raise ValueError("unknown password method %r" % (method,))
        self.psql(prelude + sql + ";\n")

    def create_database(self, name, owner):
        """
        Create database C{name} owned by role C{owner}.
        """
        self.psql("CREATE DATABASE %s OWNER %s;\n" % (
            quote_identifier(name), quote_identifier(owner)))


SLAPD = "/usr/sbin/slapd"
LDAPADD = "/usr/bin/ldapadd"
LDAP_SCHEMA_DIR = "/etc/ldap/schema"
LDAP_MODULE_DIR = "/usr/lib/ldap"


class _Daemon(_Started):
    """
    A server process run in the foreground for as long as it is needed, in
    a folder of its own (made and removed by it unless given): a context
    manager, stopped with L{stop}.
    """

    _process = None
    _owns_directory = False
    directory = None

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    def _stop_process(self):
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None

    def stop(self):
        """
        Stop the server (its sessions end with it) and remove its folder if
        it made it.  Safe to call more than once.
        """
        self._stop_process()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False


class LdapServer(_Daemon):
    """
    A private OpenLDAP C{slapd} on 127.0.0.1, for as long as it is needed:
    an MDB database under L{suffix} with the C{memberof} overlay, plain
    LDAP (StartTLS offered) and LDAPS on two free ports, TLS from a
    throwaway CA.

        with LdapServer() as directory:
            directory.add_ldif(LDIF)
            ldap3.Connection(directory.url, directory.root_dn, directory.root_password)

    @ivar suffix: the database's suffix, C{"dc=example,dc=org"} by default;
        L{start} creates its root entry.
    @ivar root_dn: the database's administrator, who may write anything.
    @ivar root_password: its password, generated.
    @ivar port: the plain LDAP port (StartTLS), once started.
    @ivar tls_port: the LDAPS port, once started.
    @ivar ca: the L{testbed.pki.CertificateAuthority} that signed the
        server's certificate (for C{127.0.0.1} and C{localhost}).
    @ivar ca_path: that CA's PEM file.
    @ivar log_path: slapd's standard output and error.
    @ivar access: C{access} lines for the database, without the keyword.
    """

    host = "127.0.0.1"

    def __init__(self, suffix="dc=example,dc=org", directory=None, slapd=SLAPD, access=(), idle_timeout=None):
        self.suffix = suffix
        self.access = list(access)
        # slapd closes connections idle this many seconds (idletimeout).
        self.idle_timeout = idle_timeout
        self.root_dn = "cn=admin," + suffix
        self.root_password = secrets.token_urlsafe(18)
        self.directory = directory
        self.slapd = slapd
        self.port = None
        self.tls_port = None
        self.ca = None
        self.ca_path = None
        self.log_path = None
        self._owns_directory = False
        self._process = None

    def __repr__(self):
        return "<LdapServer %s:%s in %s%s>" % (
            self.host, self.port, self.directory, "" if self.running else " (stopped)",
        )


    @property
    def url(self):
        return "ldap://%s:%d" % (self.host, self.port)

    @property
    def ldaps_url(self):
        return "ldaps://%s:%d" % (self.host, self.tls_port)

    def start(self):
        """
        Write C{slapd.conf} and the TLS files, start slapd in the
        foreground as a child process and wait until it answers; then add
        the suffix's root entry.

        @raise ThrowawayError: with the tail of slapd's output when it does
            not come up.
        """
        if self.running:
            raise ThrowawayError("%r is already running" % (self,))
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="hoopgw-ldap-")
            self._owns_directory = True
        else:
            self.directory = os.path.abspath(self.directory)
            os.makedirs(self.directory, exist_ok=True)
        try:
            self._write_tls_files()
            self._write_configuration()
            for attempt in range(_START_ATTEMPTS):
                self.port, self.tls_port = free_port(self.host), free_port(self.host)
                if self._start_server() or attempt + 1 == _START_ATTEMPTS:
                    break
            if not self.running:
                raise ThrowawayError("slapd did not start\n--- %s ---\n%s" % (self.log_path, _tail(self.log_path)))
            top = self.suffix.split(",")[0].split("=", 1)[1]
            self.add_ldif(
                "dn: %s\nobjectClass: dcObject\nobjectClass: organization\no: %s\ndc: %s\n"
                % (self.suffix, top, top)
            )
        except BaseException:
            self.stop()
            raise

    def _write_tls_files(self):
        self.ca = pki.make_ca("hoopgw throwaway LDAP CA")
        server = self.ca.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"], server=True)
        self._certificate, self._key = server.write(self.directory, "slapd")
        self.ca_path = os.path.join(self.directory, "ca.crt")
        with open(self.ca_path, "wb") as f:
            f.write(self.ca.certificate_pem())

    def _write_configuration(self):
        database = os.path.join(self.directory, "db")
        os.makedirs(database, exist_ok=True)
        lines = ["include %s/%s.schema" % (LDAP_SCHEMA_DIR, name) for name in ("core", "cosine", "inetorgperson", "nis")]
        lines += [
            "modulepath %s" % (LDAP_MODULE_DIR,),
            "moduleload back_mdb",
            "moduleload memberof",
            "pidfile %s" % (os.path.join(self.directory, "slapd.pid"),),
        ]
        if self.idle_timeout:
            lines.append("idletimeout %d" % (self.idle_timeout,))
        lines += [
            "TLSCertificateFile %s" % (self._certificate,),
            "TLSCertificateKeyFile %s" % (self._key,),
            "TLSCACertificateFile %s" % (self.ca_path,),
            "database mdb",
            "maxsize 16777216",
            'suffix "%s"' % (self.suffix,),
            'rootdn "%s"' % (self.root_dn,),
            "rootpw %s" % (self.root_password,),
            "directory %s" % (database,),
            "index objectClass,uid,cn,member eq",
            "overlay memberof",
        ]
        # Access rules (slapd.access(5)), e.g. "to * by dn.exact=... read by * none"; the root DN is never bound by them.
        lines += ["access %s" % (rule,) for rule in self.access]
        self.config_path = os.path.join(self.directory, "slapd.conf")
        with open(os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log_path = os.path.join(self.directory, "slapd.log")

    def _start_server(self):
        """
        Start slapd and wait for both ports; C{False} when it gave up (a
        port taken meanwhile, say).
        """
        urls = "ldap://%s:%d/ ldaps://%s:%d/" % (self.host, self.port, self.host, self.tls_port)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self.slapd, "-d", "0", "-h", urls, "-f", self.config_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if all(_answers(self.host, port) for port in (self.port, self.tls_port)):
                return True
            time.sleep(0.05)
        self._stop_process()
        return False

    def add_ldif(self, ldif):
        """
        Add the entries of C{ldif} (text) with the real C{ldapadd}, as the
        administrator.

        @raise ThrowawayError: with ldapadd's complaint.
        """
        result = subprocess.run(
            [LDAPADD, "-x", "-H", self.url, "-D", self.root_dn, "-y", self._password_file()],
            input=ldif, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_environment(),
        )
        if result.returncode != 0:
            raise ThrowawayError("ldapadd failed with status %d: %s" % (result.returncode, result.stderr.strip()))

    def _password_file(self):
        path = os.path.join(self.directory, "root.password")
        if not os.path.exists(path):
            _write_secret(path, self.root_password)
        return path



def _answers(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _write_secret(path, text):
    # ldapadd -y takes the file's bytes as they are: no trailing newline.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)


SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_SSHD_READY_SECONDS = 10


def ssh_keygen(path, key_type="ed25519", comment=""):
    """
    Generate an unencrypted key pair with the real C{ssh-keygen}.

    @return: the public key line (C{path}.pub's content, stripped).
    """
    for name in (path, path + ".pub"):
        if os.path.exists(name):
            os.unlink(name)
    arguments = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", path]
    if key_type == "rsa":
        arguments[4:4] = ["-b", "2048"]
    result = subprocess.run(arguments, capture_output=True, text=True)
    if result.returncode != 0:
        raise ThrowawayError("ssh-keygen failed: %s" % (result.stderr.strip(),))
    with open(path + ".pub") as handle:
        return handle.read().strip()


class SshServer(_Daemon):
    """
    A private OpenSSH server on 127.0.0.1: the distribution's C{sshd} in the
    foreground (C{sshd -D -e}) with its own configuration, host key and
    C{authorized_keys}, so that only the keys given to L{authorize} log
    in, as the user running this process.

        with SshServer() as server:
            server.authorize(public_key_line)
            # ssh -p server.port -i key server.login@127.0.0.1

    @ivar port: its TCP port.
    @ivar login: the account clients log in as (this process's user).
    @ivar host_key: the server's public host key line.
    @ivar log_path: where sshd writes its log.
    """

    host = "127.0.0.1"

    def __init__(self, directory=None, settings=None):
        self.directory = directory
        self.settings = dict(settings or {})
        self.port = None
        self.host_key = None
        self.log_path = None
        self.login = pwd.getpwuid(os.getuid()).pw_name
        self._process = None
        self._owns_directory = False


    @property
    def authorized_keys_path(self):
        return os.path.join(self.directory, "authorized_keys")

    def start(self):
        """
        Write the configuration and start C{sshd}; return once it accepts
        connections.

        @raise ThrowawayError: when it does not start; with its log.
        """
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="hoopgw-sshd-")
            self._owns_directory = True
        os.makedirs(self.directory, exist_ok=True)
        self.log_path = os.path.join(self.directory, "sshd.log")
        key_path = os.path.join(self.directory, "ssh_host_ed25519_key")
        self.host_key = ssh_keygen(key_path, comment="hoopgw-throwaway-sshd")
        open(self.authorized_keys_path, "a").close()
        if os.geteuid() == 0:
            # sshd's privilege separation needs this folder to exist.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port(self.host)
            config = self._write_configuration(key_path)
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            if self._wait_until_ready():
                return
            self._stop_process()
            if "Address already in use" in _tail(self.log_path) and attempt + 1 < _START_ATTEMPTS:
                continue
            raise ThrowawayError("sshd did not start\n--- %s ---\n%s" % (self.log_path, _tail(self.log_path)))

    def _write_configuration(self, key_path):
        settings = {
            "Port": self.port,
            "ListenAddress": self.host,
            "HostKey": key_path,
            "PidFile": "none",
            "AuthorizedKeysFile": self.authorized_keys_path,
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            "StrictModes": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowTcpForwarding": "yes",
            "X11Forwarding": "no",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "AcceptEnv": "LANG LC_*",
            "Subsystem": "sftp %s" % (SFTP_SERVER,),
            "MaxStartups": "200",
            "MaxSessions": "100",
            "LogLevel": "VERBOSE",
        }
        settings.update(self.settings)
        path = os.path.join(self.directory, "sshd_config")
        with open(path, "w") as handle:
            for name, value in settings.items():
                handle.write("%s %s\n" % (name, value))
        return path

    def _wait_until_ready(self):
        deadline = time.monotonic() + _SSHD_READY_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as probe:
                    probe.settimeout(2)
                    if probe.recv(4).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def authorize(self, public_key_line):
        """
        Let the holder of this key log in.
        """
        with open(self.authorized_keys_path, "a") as handle:
            handle.write(public_key_line.strip() + "\n")

