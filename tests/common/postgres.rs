//! A throwaway PostgreSQL server for the audit store tests: `initdb` in a temporary folder and
//! `postgres` on a free port of 127.0.0.1, with password authentication. It is stopped and its
//! folder removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// User and password of the superuser that `initdb` creates.
pub const USER: &str = "tierd";
pub const PASSWORD: &str = "audit-test-password";

/// Time allowed for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TempPostgres {
    pub port: u16,
    bin: PathBuf,
    data: tempfile::TempDir,
    /// The account the server runs as, when the tests run as root, which PostgreSQL rejects.
    run_as: Option<&'static str>,
    child: Mutex<Option<Child>>,
}

impl TempPostgres {
    /// Creates a cluster and starts its server.
    pub fn start() -> Result<Self, String> {
        let bin = server_bin_dir()?;
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then_some("postgres");

        // A folder under /tmp, because the server's account may not reach the target folder.
        let data = tempfile::Builder::new()
            .prefix("tierd-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("create a folder for PostgreSQL: {e}"))?;
        let password_file = data.path().join("password");
        std::fs::write(&password_file, PASSWORD).map_err(|e| format!("write the password file: {e}"))?;
        if let Some(user) = run_as {
            chown(data.path(), user)?;
        }
        let cluster = data.path().join("cluster");

        let server = Self {
            port: super::free_port(),
            bin,
            data,
            run_as,
            child: Mutex::new(None),
        };

        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(&cluster)
            .args(["-U", USER, "-A", "scram-sha-256", "--no-sync", "-E", "UTF8"])
            .arg(format!("--pwfile={}", password_file.display()));
        let output = initdb.output().map_err(|e| format!("run initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&output.stderr)));
        }
        server.run()?;
        Ok(server)
    }

    /// Returns the URL of `database`, with the password when `with_password` is set.
    pub fn url(&self, database: &str, with_password: bool) -> String {
        let credentials = if with_password { format!("{USER}:{PASSWORD}") } else { USER.to_string() };
        format!("postgres://{credentials}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` and returns its URL with the password.
    pub fn create_database(&self, database: &str) -> String {
        let mut client = postgres::Client::connect(&self.url("postgres", true), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .unwrap_or_else(|e| panic!("create database {database}: {e}"));
        self.url(database, true)
    }

    /// Stops the server and starts it again on the same port and data, which closes every
    /// client connection.
    pub fn restart(&self) -> Result<(), String> {
        self.stop();
        self.run()
    }

    fn cluster(&self) -> PathBuf {
        self.data.path().join("cluster")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        };
        command.stdin(Stdio::null());
        command
    }

    fn run(&self) -> Result<(), String> {
        let log = std::fs::File::create(self.data.path().join("server.log")).map_err(|e| format!("create the log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("clone the log handle: {e}"))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.cluster())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.data.path())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("start postgres: {e}"))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);

        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if postgres::Client::connect(&self.url("postgres", true), postgres::NoTls).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.data.path().join("server.log")).unwrap_or_default();
        Err(format!("PostgreSQL did not accept connections within {START_TIMEOUT:?}:\n{log}"))
    }

    /// Stops the server and removes its folder, for a server in a `static`, which is never
    /// dropped.
    pub fn shut_down(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.data.path());
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.cluster())
            .args(["stop", "-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let stopped = Instant::now();
        while stopped.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns the folder with `initdb` and `postgres`: the first one on the PATH, or the newest of
/// Debian's `/usr/lib/postgresql/VERSION/bin`.
fn server_bin_dir() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(dir) = on_path.into_iter().find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file()) {
        return Ok(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|dir| dir.join("initdb").is_file());
    versions.sort();
    versions.pop().ok_or_else(|| {
        "PostgreSQL's initdb and postgres were not found on the PATH or in /usr/lib/postgresql; \
         install the postgresql package (scripts/test.sh does when run as root)"
            .to_string()
    })
}

fn chown(path: &Path, user: &str) -> Result<(), String> {
    let status = Command::new("chown")
        .args(["-R", &format!("{user}:")])
        .arg(path)
        .status()
        .map_err(|e| format!("run chown: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("chown {user} {} failed", path.display()))
    }
}
