#!/usr/bin/env node
// A Fluent Forward v1 receiver for eptrace's tests: @fluent-org/logger's FluentServer (acks always on:
// it answers {"ack": chunk} to every message that carries the chunk option).
//
//   node fluent_server.js --port N [--shared-key K --server-hostname H]
//                         [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--ids-only]
//
// stdout, one JSON object a line:
//   {"listening": PORT}                                    once, when it accepts connections
//   {"tag": T, "time": [SEC, NSEC], "id": EVENT_ID, "record": {...}}   for every entry received
// "time" is [SEC, NSEC] for an EventTime, a number for an integer time. --ids-only leaves out "record"
// (benchmarks). --tls-client-ca requires clients to present a certificate signed by that CA.
// Errors go to stderr. SIGTERM/SIGINT close the server.
"use strict";

const fs = require("fs");
const path = require("path");

let FluentServer;
try {
  ({FluentServer} = require(path.join(__dirname, "node_modules", "@fluent-org", "logger")));
} catch (e) {
  process.stderr.write(`cannot load @fluent-org/logger (run 'make setup'): ${e.message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {port: 0, idsOnly: false};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    switch (arg) {
      case "--port": opts.port = parseInt(value(), 10); break;
      case "--host": opts.host = value(); break;
      case "--shared-key": opts.sharedKey = value(); break;
      case "--server-hostname": opts.serverHostname = value(); break;
      case "--tls-cert": opts.tlsCert = value(); break;
      case "--tls-key": opts.tlsKey = value(); break;
      case "--tls-client-ca": opts.tlsClientCa = value(); break;
      case "--ids-only": opts.idsOnly = true; break;
      default: throw new Error(`unknown argument ${arg}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) throw new Error("bad --port");
  if (!!opts.tlsCert !== !!opts.tlsKey) throw new Error("--tls-cert and --tls-key go together");
  return opts;
}

// Every line reaches stdout whole before anything else happens (a busy retry while the pipe is full).
function writeAll(text) {
  const buf = Buffer.from(text);
  for (let off = 0; off < buf.length;) {
    try {
      off += fs.writeSync(1, buf, off);
    } catch (e) {
      if (e.code !== "EAGAIN") throw e;
    }
  }
}

// FluentServer writes a message's ack before it emits the message's entries. Acks are deferred by one tick
// here, so that the entries are printed (synchronously) before their ack leaves: a server killed at any
// moment has printed everything it acknowledged, and the tests can hold it to "acked = received".
const ACK_PREFIX = Buffer.from([0x81, 0xa3, 0x61, 0x63, 0x6b]);     // msgpack {"ack": ...}
class PrintBeforeAckServer extends FluentServer {
  handleConnection(socket) {
    const write = socket.write.bind(socket);
    socket.write = (data, ...rest) => {
      const bytes = data instanceof Uint8Array ? Buffer.from(data.buffer, data.byteOffset, data.byteLength) : null;
      if (!bytes || !bytes.subarray(0, ACK_PREFIX.length).equals(ACK_PREFIX)) {
        return write(data, ...rest);
      }
      process.nextTick(() => { if (!socket.destroyed) write(data, ...rest); });
      return true;
    };
    return super.handleConnection(socket);
  }
}

function timeOf(time) {
  if (typeof time === "number") return time;
  return [time.epoch, time.nano];   // EventTime
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const options = {listenOptions: {port: opts.port, host: opts.host || "127.0.0.1"}};
  if (opts.sharedKey !== undefined) {
    options.security = {
      serverHostname: opts.serverHostname || "fluent-test-server",
      sharedKey: opts.sharedKey,
      authorize: false,
      userDict: {},
    };
  }
  if (opts.tlsCert) {
    options.tlsOptions = {cert: fs.readFileSync(opts.tlsCert), key: fs.readFileSync(opts.tlsKey)};
    if (opts.tlsClientCa) {
      Object.assign(options.tlsOptions, {
        ca: fs.readFileSync(opts.tlsClientCa), requestCert: true, rejectUnauthorized: true,
      });
    }
  }
  const server = new PrintBeforeAckServer(options);
  server.on("entry", (tag, time, record) => {
    const id = record && record.event ? record.event.id : undefined;
    const line = opts.idsOnly ? {tag, time: timeOf(time), id} : {tag, time: timeOf(time), id, record};
    writeAll(JSON.stringify(line) + "\n");
  });
  await server.listen();
  writeAll(JSON.stringify({listening: server.port}) + "\n");
  const stop = () => {
    server.close().then(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch(e => {
  process.stderr.write(`fluent_server: ${e.stack || e}\n`);
  process.exit(1);
});
