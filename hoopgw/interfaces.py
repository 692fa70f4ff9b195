"""
The interfaces hoopgw's parts meet at: addon factories (the plugin
interface), addons (found by method name, as in mitmproxy), protocol front
ends and stores.
"""

from zope.interface import Attribute, Interface


class IAddonFactory(Interface):
    """
    A loadable enforcement step.  Built-ins and third-party addons provide
    this as module-level objects in C{hoopgw.plugins} (Twisted plugins) or
    in a Python file named by path in the configuration.
    """

    name = Attribute("The name the configuration uses for this addon.")
    description = Attribute("One sentence saying what the addon does.")
    options = Attribute("A sequence of L{hoopgw.options.Option}: what the addon accepts.")

    def check_connection(options, connection, providers, path):
        """
        Optional: check this addon's options against the connection they
        are given for, when the configuration is loaded (before anything
        listens).

        @param options: the validated options.
        @param connection: the L{hoopgw.config.ConnectionConfig}.
        @param providers: the configured identity providers, by name.
        @param path: the key path of these options, for errors.
        @raise hoopgw.options.ConfigError: naming the key path and what to
            change.
        """

    def check_gateway(options, gateway, path):
        """
        Optional: check this addon's options against the gateway's own
        settings (the approvals listener, the store).

        @param gateway: the L{hoopgw.config.GatewayConfig}.
        @raise hoopgw.options.ConfigError: as for L{check_connection}.
        """

    def build(options, context):
        """
        Make the addon for one connection.

        @param options: the validated options, a mapping of option name to value.
        @param context: the L{hoopgw.addon.AddonContext}: the gateway's
            store, identity providers, approvals broker, clock, and the
            connection's configuration.
        @return: an object with any subset of the L{IAddon} hooks.
        """


class IAddon(Interface):
    """
    The hooks an addon may implement; the chain calls those it finds, by
    name, in chain order.  Every hook may return a L{Deferred}.  An addon
    that raises denies the session or command: the chain fails closed.
    """

    name = Attribute("The addon's name, as in the configuration.")

    def session_started(session):
        """
        A client connected and presented credentials.

        @return: a L{hoopgw.model.Decision}, or L{None} for no opinion.
            The identity addon sets C{session.identity} here.
        """

    def command_received(session, command):
        """
        The client asked for C{command}; C{command.decision} holds the
        decision so far.

        @return: a L{hoopgw.model.Decision}, or L{None} for no opinion.
        """

    def result_received(session, command, chunk):
        """
        A piece of the target's answer to C{command} is on its way to the
        client.

        @param chunk: a L{hoopgw.model.ResultChunk}, to be modified in place.
        """

    def command_finished(session, command):
        """
        C{command} is over: C{command.decision} is final and
        C{command.outcome} says what happened.  Also called for commands
        that were denied before reaching this addon.
        """

    def cancel_requested(session, command, via):
        """
        The client asked to cancel what C{session} runs (a PostgreSQL
        CancelRequest with its key); the front end has stopped a pending
        decision or asked the target to cancel.  A request naming no
        session is not a cancel but a refused session.

        @param command: the L{hoopgw.model.Command} that ran, or None.
        @param via: the run id of the gateway process the request reached,
            when another one sharing the store routed it here; else None.
        """

    def session_ended(session):
        """
        The session is over (also when it was refused:
        C{session.refusal} then holds the decision).
        """

    def explain(session, command):
        """
        Optional, for C{hoopgw explain}: what this addon would decide about
        C{command} and why, without side effects (no approval requested,
        no single-use token spent).

        @return: a list of lines for the explanation.
        """


class IFrontend(Interface):
    """
    A protocol front end: a package under C{hoopgw} (C{postgres}, C{ssh},
    C{kubernetes}) whose module provides these, found by the connection's
    C{protocol}.  It turns its wire traffic into L{hoopgw.model.Session}
    and L{hoopgw.model.Command} objects for the chain and maps the chain's
    decisions back onto its wire.
    """

    def parse_connection(raw, path, listen):
        """
        Check and read the protocol's own settings of one connection
        (target, TLS, limits) when the configuration is loaded.

        @param raw: the connection's mapping from the file.
        @param path: its key path, for errors.
        @param listen: its listen endpoint string.
        @return: the settings object (C{ConnectionConfig.settings}).
        @raise hoopgw.options.ConfigError: naming the key path.
        """

    def make_factory(connection, gateway, chain):
        """
        The listening factory of one connection.

        @param connection: the L{hoopgw.config.ConnectionConfig}.
        @param gateway: the running L{hoopgw.gateway.Gateway}.
        @param chain: a callable returning the connection's current
            L{hoopgw.chain.AddonChain} (it changes on reload; a session
            keeps the chain it started with).
        @return: an object with C{close_sessions(reason)}: end every open
            session (the gateway is stopping), each with C{reason} told to
            its client and recorded; returns a L{Deferred} that fires when
            they are closed.
        """


class IStore(Interface):
    """
    The append-only, hash-chained evidence store.
    """

    def append(event, urgent=True):
        """
        Chain and persist C{event} (a JSON-serialisable mapping with at
        least C{"type"}).

        @param urgent: something waits for this event to be durable (a
            command about to run: write-ahead).  When C{False} (a command's
            end, which nothing waits on), the store may make it durable
            with the next urgent event's sync, within a short delay.

        @return: a L{Deferred} that fires with the chained event (with its
            C{seq}, C{prev} and C{hash}) once it is durable, or fails if it
            could not be made durable.
        """

    def write_attachment(name, data):
        """
        Store a named blob (an asciicast) beside the events.

        @return: a L{Deferred} firing with the blob's SHA-256 hex digest.
        """

    def close():
        """
        Flush and close.  @return: a L{Deferred}.
        """
