#!/usr/bin/env node
// A Node.js client of Magnus's GenerationService, loading the repository's .proto files at run
// time (@grpc/proto-loader): no generated code, so it cannot drift from the contract.
//
//   node generate.js --target 127.0.0.1:50051 --instruction "Correct the grammar:" \
//     --input "She go to school ." --max-new-tokens 16 [--stream] [--client-request-id ID] \
//     [--tls-ca ca.pem [--tls-cert client.pem --tls-key client.key] [--tls-server-name NAME]] \
//     [--api-key KEY]
//
// TLS: --tls-ca verifies the batcher's certificate against that CA (mutual TLS: also give the
// client certificate and key). Auth: --api-key (default $MAGNUS_API_KEY) is sent as
// `authorization: Bearer <key>`; the request then acts for the key's tenant (--tenant defaults to
// empty, which the batcher reads as the key's).
//
// Prints one JSON object per response (one for Generate; QUEUED, STARTED, FINISHED for
// --stream) on stdout. On an RPC error it prints {"error": {"code": "...", "details": ...}} on
// stderr and exits with 1; bad usage exits with 2.
'use strict';

// stderr carries only the JSON error: Node's DEP0123 warning (TLS to a target given as an IP
// address, e.g. 127.0.0.1 in a local stack) would come before it.
process.noDeprecation = true;

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.MAGNUS_PROTO_ROOT || path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'magnus/v1/generation.proto';

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (snake_case), like grpcurl prints them
    enums: String,
    longs: Number,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).magnus.v1.GenerationService;
}

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string', default: process.env.MAGNUS_TARGET || '127.0.0.1:50051' },
      instruction: { type: 'string', default: '' },
      input: { type: 'string' },
      'max-new-tokens': { type: 'string', default: '64' },
      tenant: { type: 'string' },
      'client-request-id': { type: 'string', default: '' },
      'timeout-s': { type: 'string', default: '300' },
      stream: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-server-name': { type: 'string', default: '' },
      'api-key': { type: 'string', default: process.env.MAGNUS_API_KEY || '' },
    },
  });
  if (values.input === undefined) {
    throw new Error('--input is required');
  }
  if ((values['tls-cert'] === undefined) !== (values['tls-key'] === undefined)) {
    throw new Error('--tls-cert and --tls-key go together');
  }
  if (values['tls-cert'] !== undefined && values['tls-ca'] === undefined) {
    throw new Error('--tls-cert needs --tls-ca');
  }
  if (values.tenant === undefined) {
    values.tenant = values['api-key'] ? '' : 'node-client'; // a key acts for its own tenant
  }
  return values;
}

// Plaintext without --tls-ca; TLS verified against that CA with it (mutual TLS with a client pair).
function channelCredentials(options) {
  if (options['tls-ca'] === undefined) {
    return [grpc.credentials.createInsecure(), {}];
  }
  const read = (file) => fs.readFileSync(file);
  const credentials = options['tls-cert'] === undefined
    ? grpc.credentials.createSsl(read(options['tls-ca']))
    : grpc.credentials.createSsl(read(options['tls-ca']), read(options['tls-key']), read(options['tls-cert']));
  const serverName = options['tls-server-name'];
  const channelOptions = serverName ? { 'grpc.ssl_target_name_override': serverName, 'grpc.default_authority': serverName } : {};
  return [credentials, channelOptions];
}

function callMetadata(options) {
  const metadata = new grpc.Metadata();
  if (options['api-key']) {
    metadata.set('authorization', `Bearer ${options['api-key']}`);
  }
  return metadata;
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function printError(error) {
  const trailers = error.metadata ? error.metadata.getMap() : {};
  const report = { code: statusName(error.code), details: error.details };
  if (trailers['retry-after-s'] !== undefined) {
    report.retry_after_s = Number(trailers['retry-after-s']);
  }
  process.stderr.write(`${JSON.stringify({ error: report })}\n`);
}

function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`usage error: ${error.message}\n`);
    process.exit(2);
  }
  const GenerationService = loadService();
  let credentials;
  let channelOptions;
  try {
    [credentials, channelOptions] = channelCredentials(options);
  } catch (error) {
    process.stderr.write(`usage error: ${error.message}\n`);
    process.exit(2);
  }
  const client = new GenerationService(options.target, credentials, channelOptions);
  const metadata = callMetadata(options);
  const request = {
    prompt: {
      instruction: options.instruction,
      user_input: options.input,
      max_new_tokens: Number(options['max-new-tokens']),
      tenant_id: options.tenant,
      client_request_id: options['client-request-id'],
    },
  };
  const deadline = new Date(Date.now() + Number(options['timeout-s']) * 1000);
  const fail = (error) => {
    printError(error);
    client.close();
    process.exitCode = 1;
  };

  if (options.stream) {
    const call = client.GenerateStream(request, metadata, { deadline });
    call.on('data', (event) => process.stdout.write(`${JSON.stringify(event)}\n`));
    call.on('error', fail);
    call.on('end', () => client.close());
    return;
  }
  client.Generate(request, metadata, { deadline }, (error, response) => {
    if (error) {
      fail(error);
      return;
    }
    process.stdout.write(`${JSON.stringify(response)}\n`);
    client.close();
  });
}

main();
