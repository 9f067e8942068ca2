// A storage function for Vercel's experimental-agent that keeps the agent's records in roomfs.
//
//   import { roomfsStorage } from './roomfs-storage.mjs';
//   const storage = roomfsStorage({ socketPath: '/run/roomfs/control.sock' });
//   // give `storage` to the agent where it takes a storage function
//
// The SDK hands the storage function its store events ({ method: 'session.get', id }, ...);
// each is forwarded as is to the daemon's POST /v1/storage, and the daemon's answer is returned.
// Records then show up read-only under .meta/ in the session's mounted directory.
// Node.js built-ins only.
import http from 'node:http';

export class RoomfsStorageError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'RoomfsStorageError';
    this.status = status;
  }
}

export function roomfsStorage({ socketPath = '/run/roomfs/control.sock' } = {}) {
  return async function storage(input) {
    // Accept the event itself, or a step object carrying it (`{ store: { event } }`, `{ event }`).
    const event = input?.store?.event ?? input?.event ?? input;
    if (!event || typeof event.method !== 'string') {
      throw new RoomfsStorageError(400, 'a store event needs a "method" such as "session.get"');
    }
    return post(socketPath, '/v1/storage', event);
  };
}

function post(socketPath, path, body) {
  const payload = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        socketPath,
        path,
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(payload),
        },
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let value;
          try {
            value = JSON.parse(text);
          } catch {
            return reject(new RoomfsStorageError(res.statusCode, `not JSON from roomfs: ${text}`));
          }
          if (res.statusCode >= 400) {
            return reject(new RoomfsStorageError(res.statusCode, value?.error ?? text));
          }
          resolve(value);
        });
      },
    );
    req.on('error', (e) =>
      reject(new RoomfsStorageError(0, `cannot reach the roomfs daemon at ${socketPath}: ${e.message}`)),
    );
    req.end(payload);
  });
}
