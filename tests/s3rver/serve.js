// s3rver (a second S3 implementation, https://github.com/jamhall/s3rver) for the tests: tests/s3server.py
// starts `node serve.js DIRECTORY ACCESS_KEY_ID` and reads "listening on HOST:PORT" from stdout.
// s3rver only knows the access key S3RVER; the tests sign with their own fake key, so it is added here
// (s3rver checks SigV4 requests only for a known access key id, not their signature). The server stops
// when its stdin closes, so it never outlives the pytest process that started it.
'use strict';
const S3rver = require('s3rver');
const { DUMMY_ACCOUNT } = require('s3rver/lib/models/account');

const [directory, accessKeyId] = process.argv.slice(2);
if (!directory || !accessKeyId) {
  console.error('usage: node serve.js DIRECTORY ACCESS_KEY_ID');
  process.exit(2);
}
DUMMY_ACCOUNT.createKeyPair(accessKeyId, accessKeyId);
new S3rver({ address: '127.0.0.1', port: 0, directory, silent: true })
  .run()
  .then(({ address, port }) => console.log(`listening on ${address}:${port}`))
  .catch((err) => {
    console.error(err);
    process.exit(1);
  });
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
