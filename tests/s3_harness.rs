//! The SeaweedFS harness the S3 store's tests stand on (tests/common/s3.rs), checked through an
//! independent S3 client (boto3): requests are signed and checked, data survives a crash and a
//! restart, a paused store hangs, and nothing is left behind, even by a test that panics.

mod common;

use std::time::Duration;

use common::s3::SeaweedFs;

#[test]
fn objects_survive_a_crash_and_restart() {
    let mut s3 = SeaweedFs::start();
    s3.boto3(
        r#"
s3.put_object(Bucket=BUCKET, Key='rooms/r1/hello.txt', Body=b'hello', Metadata={'mode': '100644'})
big = bytes(range(256)) * (24 << 12)  # 6 MiB: two parts
up = s3.create_multipart_upload(Bucket=BUCKET, Key='rooms/r1/big')['UploadId']
parts = [{'PartNumber': n, 'ETag': s3.upload_part(Bucket=BUCKET, Key='rooms/r1/big', UploadId=up,
          PartNumber=n, Body=body)['ETag']} for n, body in ((1, big[:5 << 20]), (2, big[5 << 20:]))]
s3.complete_multipart_upload(Bucket=BUCKET, Key='rooms/r1/big', UploadId=up,
                             MultipartUpload={'Parts': parts})
r = s3.get_object(Bucket=BUCKET, Key='rooms/r1/hello.txt')
assert r['Body'].read() == b'hello' and r['Metadata'] == {'mode': '100644'}, r
assert s3.get_object(Bucket=BUCKET, Key='rooms/r1/big')['Body'].read() == big
"#,
    );
    let pid = s3.pid().unwrap();
    s3.restart(); // SIGKILL, then the same ports and data
    assert_ne!(s3.pid(), Some(pid));
    let out = s3.boto3(
        r#"
r = s3.get_object(Bucket=BUCKET, Key='rooms/r1/hello.txt')
print(r['Body'].read().decode(), r['Metadata']['mode'])
assert s3.get_object(Bucket=BUCKET, Key='rooms/r1/big')['Body'].read() == bytes(range(256)) * (24 << 12)
print(sorted(o['Key'] for o in s3.list_objects_v2(Bucket=BUCKET)['Contents']))
"#,
    );
    assert_eq!(
        out, "hello 100644\n['rooms/r1/big', 'rooms/r1/hello.txt']\n",
        "after the restart"
    );
}

#[test]
fn requests_must_be_signed_with_its_key() {
    let s3 = SeaweedFs::start();
    let out = s3.boto3(
        r#"
import urllib.request, urllib.error
s3.put_object(Bucket=BUCKET, Key='k', Body=b'v')
def status(f):
    try:
        f()
        return 200
    except botocore.exceptions.ClientError as e:
        return e.response['Error']['Code']
    except urllib.error.HTTPError as e:
        return e.code
wrong_secret = boto3.client('s3', aws_access_key_id=os.environ['AWS_ACCESS_KEY_ID'],
                            aws_secret_access_key='not-the-secret')
unknown_key = boto3.client('s3', aws_access_key_id='nobody', aws_secret_access_key='x')
endpoint = os.environ['AWS_ENDPOINT_URL']
print(status(lambda: wrong_secret.get_object(Bucket=BUCKET, Key='k')),
      status(lambda: unknown_key.get_object(Bucket=BUCKET, Key='k')),
      status(lambda: urllib.request.urlopen(f'{endpoint}/{BUCKET}/k')),
      status(lambda: s3.get_object(Bucket=BUCKET, Key='k')))
"#,
    );
    assert_eq!(
        out, "SignatureDoesNotMatch InvalidAccessKeyId 403 200\n",
        "wrong secret, unknown key, unsigned, right key"
    );
}

#[test]
fn a_paused_store_hangs_a_stopped_one_refuses_and_drop_cleans_up_after_a_panic() {
    let mut s3 = SeaweedFs::start();
    let head = r#"
import socket
try:
    s3b = boto3.client('s3', config=Config(s3={'addressing_style': 'path'}, connect_timeout=1,
                                           read_timeout=1, retries={'total_max_attempts': 1}))
    s3b.head_bucket(Bucket=BUCKET)
    print('answered')
except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError):
    print('timed out')
except botocore.exceptions.EndpointConnectionError:
    print('refused')
"#;
    assert_eq!(s3.boto3(head), "answered\n");
    s3.pause();
    assert_eq!(s3.boto3(head), "timed out\n");
    s3.resume();
    assert_eq!(s3.boto3(head), "answered\n");
    s3.stop();
    assert_eq!(s3.boto3(head), "refused\n");
    s3.restart();
    assert_eq!(s3.boto3(head), "answered\n");

    // A test that panics while its store runs (here: paused) still stops it and removes its data.
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let mut s3 = s3;
        s3.pause();
        tx.send((s3.pid().unwrap(), s3.data_dir())).unwrap();
        panic!("a deliberate panic, to check that the drop still cleans up");
    });
    assert!(r.is_err());
    let (pid, data) = rx.recv_timeout(Duration::from_secs(1)).unwrap();
    // SAFETY: kill(2) with signal 0 only asks whether the pid exists.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    assert!(!alive, "weed mini {pid} still runs");
    assert!(!data.exists(), "{} is still there", data.display());
}
