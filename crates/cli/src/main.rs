//! The `vicugna` command: one binary for chatting with, serving, training and
//! evaluating LLM chatbots.

mod bench;
mod chat_cmd;
mod data_cmd;
mod generate;
mod model_arg;
mod serve_cmd;
mod template;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vicugna", version, about = "Train, serve and evaluate LLM chatbots")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models: controller, a worker and the OpenAI-compatible gateway on this machine.
    Serve(serve_cmd::ServeArgs),
    /// Run a controller: it tracks which worker serves which model (FastChat protocol).
    Controller(serve_cmd::ControllerArgs),
    /// Run a model worker that registers with a controller.
    Worker(serve_cmd::WorkerArgs),
    /// Run the OpenAI-compatible API in front of a controller.
    Api(serve_cmd::ApiArgs),
    /// Chat with a model in the terminal.
    Chat(chat_cmd::ChatArgs),
    /// Generate text from a prompt (streams it; --json prints one object).
    Generate(generate::GenerateArgs),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(bench::BenchArgs),
    /// List or render conversation templates.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Prepare training data (ShareGPT JSON): clean, split, filter, stats, sample, merge, inspect.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Fine-tune a model (full or LoRA) on conversations; resumable.
    Train(train_cmd::TrainArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve_cmd::run_serve(a),
        Command::Controller(a) => serve_cmd::run_controller(a),
        Command::Worker(a) => serve_cmd::run_worker(a),
        Command::Api(a) => serve_cmd::run_api(a),
        Command::Chat(a) => chat_cmd::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Template(c) => template::run(c),
        Command::Data(c) => data_cmd::run(c),
        Command::Train(a) => train_cmd::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
