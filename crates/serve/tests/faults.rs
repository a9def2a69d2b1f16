//! Faults with workers in their own processes: `kill -9` of a worker while it
//! streams, expiry, failover to the survivor, a restarted worker serving again;
//! and a worker on another host (its own network namespace, as root).
//!
//! The worker processes are this test binary run again with only the
//! `child_worker` test selected and `VICUGNA_CHILD_*` set.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use vicugna_serve::ControllerOptions;

/// Kills the child process when dropped (also on panic).
struct Reaper(Child);

impl Reaper {
    /// SIGKILL, as `kill -9`.
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Not a test on its own: the body of a worker process (see the module doc).
#[test]
fn child_worker() {
    let (Ok(host), Ok(port), Ok(ctl)) = (
        std::env::var("VICUGNA_CHILD_HOST"),
        std::env::var("VICUGNA_CHILD_PORT"),
        std::env::var("VICUGNA_CHILD_CONTROLLER"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let l = TcpListener::bind(format!("{host}:{port}")).await.unwrap();
        let url = format!("http://{host}:{port}");
        let mut opts = vicugna_serve::WorkerOptions::new(&url, &ctl, vec![model_name()]);
        opts.heart_beat_interval = Duration::from_millis(250);
        opts.control = control();
        let w = vicugna_serve::Worker::new(engine(), opts).unwrap();
        let (_trigger, shutdown) = vicugna_serve::shutdown_channel();
        eprintln!("child worker listening on {url}");
        vicugna_serve::run_worker(l, w, shutdown, GRACE).await.unwrap();
    });
}

fn spawn_worker(prefix: &[&str], host: &str, port: u16, controller: &str) -> Reaper {
    let exe = std::env::current_exe().unwrap();
    let (program, args): (String, Vec<String>) = match prefix.split_first() {
        Some((p, rest)) => (
            p.to_string(),
            rest.iter()
                .map(|s| s.to_string())
                .chain([exe.display().to_string()])
                .collect(),
        ),
        None => (exe.display().to_string(), vec![]),
    };
    let child = Command::new(program)
        .args(args)
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env("VICUGNA_CHILD_HOST", host)
        .env("VICUGNA_CHILD_PORT", port.to_string())
        .env("VICUGNA_CHILD_CONTROLLER", controller)
        .stdout(Stdio::null())
        .spawn()
        .expect("start a worker process");
    Reaper(child)
}

async fn status(worker: &str) -> Option<Value> {
    let r = control_http()
        .post(format!("{worker}/worker_get_status"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

async fn address(ctl: &str, model: &str, exclude: &[&str]) -> String {
    let (_, v) = ctl_post(
        &format!("{ctl}/get_worker_address"),
        &json!({"model": model, "exclude": exclude}),
    )
    .await;
    v["address"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_ends_its_stream_with_an_error_and_the_survivor_serves() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let (ctl, _tc) = controller(ControllerOptions {
            heart_beat_expiration: Duration::from_millis(1500),
            ..ControllerOptions::default()
        })
        .await;
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let model = model_name();
        let ports = [free_port(), free_port()];
        let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let mut procs: Vec<Reaper> = ports.iter().map(|&p| spawn_worker(&[], "127.0.0.1", p, &ctl)).collect();
        eventually(Duration::from_secs(60), "two workers registered", || async {
            address(&ctl, &model, &[&urls[0]]).await == urls[1] && address(&ctl, &model, &[&urls[1]]).await == urls[0]
        })
        .await;

        // A long stream; find the worker that runs it and kill it.
        let body = json!({"model": model, "prompt": "Once upon a time", "max_tokens": 4000,
                          "ignore_eos": true, "stream": true});
        let r = http()
            .post(format!("{api}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut stream = r.bytes_stream();
        let mut got = stream.next().await.unwrap().unwrap().to_vec();
        let mut victim = None;
        let t0 = Instant::now();
        while victim.is_none() {
            for (i, u) in urls.iter().enumerate() {
                if status(u).await.is_some_and(|s| s["queue_length"] == 1) {
                    victim = Some(i);
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no worker reports the request");
        }
        let victim = victim.unwrap();
        let survivor = 1 - victim;
        procs[victim].kill9();

        // The stream ends, with an error event then [DONE], instead of hanging.
        let rest = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(b) = stream.next().await {
                match b {
                    Ok(b) => got.extend_from_slice(&b),
                    Err(_) => break,
                }
            }
        })
        .await;
        assert!(rest.is_ok(), "the stream hung after its worker died");
        let events = parse_sse(&String::from_utf8_lossy(&got));
        let err = events
            .iter()
            .find(|e| e.get("error").is_some())
            .expect("an error event");
        assert_eq!(err["error"]["code"], "worker_failed", "{err}");
        // The client learns that a worker failed, not where the workers live.
        let port = format!(":{}", ports[victim]);
        assert!(!err.to_string().contains(&port), "{err}");
        assert_eq!(events.last().unwrap(), "[DONE]");

        // Requests keep working (the gateway avoids the dead worker at once).
        for _ in 0..4 {
            let (s, r) = post(
                &format!("{api}/v1/completions"),
                &json!({"model": model, "prompt": "Hi", "max_tokens": 2}),
            )
            .await;
            assert_eq!(s, 200, "{r}");
        }
        // The controller drops the dead worker within the expiry.
        eventually(
            Duration::from_secs(6),
            "the controller to drop the dead worker",
            || async { address(&ctl, &model, &[&urls[survivor]]).await.is_empty() },
        )
        .await;
        assert_eq!(address(&ctl, &model, &[]).await, urls[survivor]);

        // A restarted worker registers and serves again.
        procs[victim] = spawn_worker(&[], "127.0.0.1", ports[victim], &ctl);
        eventually(Duration::from_secs(60), "the restarted worker to register", || async {
            address(&ctl, &model, &[&urls[survivor]]).await == urls[victim]
        })
        .await;
        let served = |u: String| async move {
            let m = control_http()
                .get(format!("{u}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.lines()
                .find_map(|l| l.strip_prefix("vicugna_worker_requests_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let t0 = Instant::now();
        while served(urls[victim].clone()).await == 0 {
            let (s, r) = post(
                &format!("{api}/v1/chat/completions"),
                &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
            )
            .await;
            assert_eq!(s, 200, "{r}");
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the restarted worker got no request"
            );
        }
    })
    .await
    .expect("the test took too long");
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create(tag: u32) -> Result<(Netns, String, String), String> {
        let name = format!("vcg{tag}");
        let (host_if, ns_if) = (format!("vcg{tag}a"), format!("vcg{tag}b"));
        let net = 20 + tag % 200;
        let (host_ip, ns_ip) = (format!("10.203.{net}.1"), format!("10.203.{net}.2"));
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        run(&["netns", "add", &name])?;
        run(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        run(&["link", "set", &ns_if, "netns", &name])?;
        run(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        run(&["link", "set", &host_if, "up"])?;
        run(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns_if,
        ])?;
        run(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok((ns, host_ip, ns_ip))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A worker on "another host": its own network namespace, reached over a veth
/// pair; the controller and gateway stay in this namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_in_its_own_network_namespace_serves_through_the_gateway() {
    if !is_root() {
        assert!(!in_ci(), "CI runs as root: the network-namespace test must run");
        eprintln!("skipping: needs root for ip netns");
        return;
    }
    let (ns, host_ip, ns_ip) = match Netns::create(std::process::id() % 10_000) {
        Ok(x) => x,
        Err(e) => {
            assert!(!in_ci(), "cannot make a network namespace: {e}");
            eprintln!("skipping: cannot make a network namespace: {e}");
            return;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        let l = TcpListener::bind(format!("{host_ip}:0")).await.unwrap();
        let ctl = vicugna_serve::listener_url(&l).unwrap();
        let _tc = spawn_controller(
            l,
            ControllerOptions {
                control: control(),
                allow_worker_hosts: ns_ip.parse().unwrap(),
                ..ControllerOptions::default()
            },
        );
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let port = free_port();
        let worker_url = format!("http://{ns_ip}:{port}");
        let _w = spawn_worker(&["ip", "netns", "exec", &ns.name], &ns_ip, port, &ctl);
        let model = model_name();
        eventually(Duration::from_secs(60), "the namespaced worker to register", || async {
            address(&ctl, &model, &[]).await == worker_url
        })
        .await;
        let (s, r) = post(
            &format!("{api}/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 12, "temperature": 0}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert!(
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("Paris"),
            "{r}"
        );
        // The worker is not reachable on this namespace's loopback: the answer came over the veth.
        assert!(reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/worker_get_status"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_err());
    })
    .await
    .expect("the test took too long");
    drop(ns);
}
